//! Snapshot with memory and restore: ramsnap (through the HostService API,
//! over gRPC, with a real StorageService) beside plain virsh, on the same
//! 1 GiB TCG guest holding 600 MiB of random data in RAM, in the same run.
//!
//!   cargo bench -p ramsnap-host --bench memory        (root; ~3 min)
//!   RAMSNAP_BENCH_RUNS=5 ... for more runs (medians are reported)
//!
//! Per run, in this order, on the one guest:
//! - ramsnap LIVE snapshot with memory (FILE domain), then StopVm and RunVm
//!   with restore onto a fresh leaf; the same PAUSED;
//! - with the memory on the BLOCK domain (LVM on loop devices: this
//!   machine's stand-in for a LUN, slower than either FILE or a real LUN);
//! - `virsh snapshot-create-as --memspec ... --diskspec ... --live
//!   --no-metadata`, and without --live; after each, `virsh restore FILE
//!   --xml` (the disk pointed at a fresh overlay, <backingStore> stripped).
//!
//! ramsnap's times are the client's wall time of SnapshotVm and RunVm; they
//! include preparing the volumes, zeroing (BLOCK), the SHA-256 of the dump
//! volume's whole capacity (RAM+200 MiB PAUSED, 2xRAM+200 MiB LIVE), the
//! metadata volume, and on restore the checks and the checksum again.
//! virsh's are the wall time of the virsh command. Guest pause: libvirt's
//! SUSPENDED/RESUMED lifecycle events for both.
#[path = "../tests/support/mod.rs"]
mod support;

use ramsnap_host::libvirt::pauses::{paused_total, PauseEvents};
use ramsnap_proto::common::v1 as common;
use ramsnap_proto::host::v1 as hpb;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};
use support::*;

const MEMORY_MIB: u64 = 1024;
const FILL_MIB: u64 = 600;

struct Bench {
    env: Env,
    vm: String,
    spec: hpb::VmSpec,
    token: String,
    events: PauseEvents,
    dir: PathBuf,
}

#[derive(Default)]
struct Samples(Vec<f64>);

impl Samples {
    fn push(&mut self, v: f64) {
        self.0.push(v);
    }

    fn median(&self) -> f64 {
        let mut v = self.0.clone();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        match v.len() {
            0 => f64::NAN,
            n if !n.is_multiple_of(2) => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }
}

fn virsh(args: &[&str]) -> String {
    let out = Command::new("virsh")
        .args(["-c", "qemu:///system"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "virsh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Bench {
    fn uuid(&self) -> uuid::Uuid {
        uuid::Uuid::parse_str(&self.vm).unwrap()
    }

    fn leaf(&self) -> common::VolumeRef {
        self.spec.disks[0].volume.clone().unwrap()
    }

    /// Waits for ticks after `mark` with the guest's token (a live guest
    /// that kept its memory).
    async fn check_alive(&mut self, mark: usize) {
        let lines = self
            .env
            .wait_ticks(&self.vm, mark, 1, Duration::from_secs(60))
            .await;
        assert!(
            !lines
                .iter()
                .any(|l| matches!(l, Line::Boot { .. } | Line::Mismatch(_))),
            "{lines:?}"
        );
        assert!(ticks(&lines).iter().all(|(t, _)| *t == self.token), "{lines:?}");
    }

    /// ramsnap: snapshot with memory, then destroy and restore onto a fresh
    /// leaf. Returns (snapshot s, restore s, pause ms, checksum s).
    async fn ramsnap(&mut self, live: bool, block: bool) -> (f64, f64, f64, f64) {
        let frozen = self.leaf();
        let overlay = self.env.child_of(&frozen).await;
        let memory = self.env.memory_volumes(block, MEMORY_MIB * MIB, live).await;
        let req = hpb::SnapshotVmRequest {
            job_id: uuid::Uuid::new_v4().to_string(),
            vm_id: self.vm.clone(),
            snapshot_id: uuid::Uuid::new_v4().to_string(),
            disks: vec![hpb::SnapshotDisk {
                current: Some(frozen.clone()),
                overlay: Some(overlay.clone()),
            }],
            memory: Some(memory.clone()),
            mode: if live {
                hpb::SnapshotMode::Live
            } else {
                hpb::SnapshotMode::Paused
            } as i32,
            compatibility_version: "3.3".into(),
        };
        let t = Instant::now();
        let (_, r) = snapshot(&mut self.env.host, req).await;
        let snap = t.elapsed().as_secs_f64();
        let r = r.expect("ramsnap snapshot");
        assert!(r.memory_saved);

        // What the checksum alone costs (the same digest, on this side).
        let dump = memory.dump.clone().unwrap();
        let path = self.env.path_of(&dump).await;
        let capacity = if live {
            2 * MEMORY_MIB + 200
        } else {
            MEMORY_MIB + 200
        } * MIB;
        let t = Instant::now();
        let d = tokio::task::spawn_blocking(move || ramsnap_host::metadata::digest(&path, capacity))
            .await
            .unwrap()
            .unwrap();
        let checksum = t.elapsed().as_secs_f64();
        assert_eq!(d.checksum.to_string(), r.dump_checksum);
        if block {
            self.env.teardown(&dump).await;
        }

        self.env.stop(&self.vm, 0).await;
        self.env.delete_volume(&overlay).await;
        let leaf = self.env.child_of(&frozen).await;
        self.spec.disks[0].volume = Some(leaf);
        let mark = self.env.console(&self.vm).await.len();
        let t = Instant::now();
        let status = self
            .env
            .run(&self.spec, Some(memory.clone()))
            .await
            .expect("ramsnap restore");
        let restore = t.elapsed().as_secs_f64();
        assert_eq!(status, hpb::VmStatus::Up);
        self.check_alive(mark).await;
        // Room for the next runs (a LIVE dump volume of this guest is 2.2 GiB).
        self.env.delete_volume(&dump).await;
        self.env.delete_volume(memory.metadata.as_ref().unwrap()).await;
        (snap, restore, r.guest_pause_ms as f64, checksum)
    }

    /// virsh: snapshot-create-as with a memspec, then destroy and restore.
    /// Returns (snapshot s, restore s, pause ms). Leaves the guest running
    /// under libvirt only; `hand_back` returns it to the host agent.
    async fn virsh(&mut self, live: bool, run: usize) -> (f64, f64, f64) {
        let name = self.env.domain_name(&self.vm);
        let frozen = self.env.live_disks(&self.vm)[0].1.clone();
        let tag = format!("{run}-{}", if live { "live" } else { "paused" });
        let mem = self.dir.join(format!("virsh-{tag}.mem"));
        let overlay = self.dir.join(format!("virsh-{tag}.qcow2"));
        let memspec = format!("file={},snapshot=external", mem.display());
        let diskspec = format!("vda,snapshot=external,file={}", overlay.display());
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
        self.events.watch(self.uuid());
        let t = Instant::now();
        virsh(&args);
        let snap = t.elapsed().as_secs_f64();
        let pause = self.pause_ms();

        // Restore: destroy, a fresh overlay on the frozen image, the saved
        // XML with its disk pointed there and no <backingStore>.
        self.env.stop(&self.vm, 0).await;
        let fresh = self.dir.join(format!("virsh-{tag}-restore.qcow2"));
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &frozen])
            .arg(&fresh)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let saved = virsh(&["save-image-dumpxml", mem.to_str().unwrap(), "--security-info"]);
        let xml = strip_backing(&saved).replace(
            &format!("<source file='{frozen}'"),
            &format!("<source file='{}'", fresh.display()),
        );
        assert!(xml.contains(fresh.to_str().unwrap()), "{xml}");
        let xml_path = self.dir.join(format!("virsh-{tag}.xml"));
        std::fs::write(&xml_path, xml).unwrap();
        let mark = self.env.console(&self.vm).await.len();
        let t = Instant::now();
        virsh(&[
            "restore",
            mem.to_str().unwrap(),
            "--xml",
            xml_path.to_str().unwrap(),
        ]);
        let restore = t.elapsed().as_secs_f64();
        self.check_alive(mark).await;
        let _ = std::fs::remove_file(&mem);
        (snap, restore, pause)
    }

    /// libvirt's SUSPENDED/RESUMED events since `watch`.
    fn pause_ms(&self) -> f64 {
        let deadline = Instant::now() + Duration::from_millis(500);
        while self.events.seen(self.uuid()).last().is_some_and(|&(_, p)| p) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        paused_total(&self.events.take(self.uuid()), Instant::now()).as_secs_f64() * 1000.0
    }

    /// The guest runs under libvirt alone after a virsh restore: destroy it
    /// and restore it through the host agent from a ramsnap snapshot taken
    /// now... which needs it running under the agent. So: boot it under the
    /// agent from the last ramsnap memory instead.
    async fn hand_back(&mut self, memory: &common::MemoryVolumeRef, frozen: &common::VolumeRef) {
        let name = self.env.domain_name(&self.vm);
        virsh(&["destroy", &name]);
        // The agent notices the domain is gone within a monitor round.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.env.status(&self.vm).await != hpb::VmStatus::Down {
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let leaf = self.env.child_of(frozen).await;
        self.spec.disks[0].volume = Some(leaf);
        let mark = self.env.console(&self.vm).await.len();
        self.env
            .run(&self.spec, Some(memory.clone()))
            .await
            .expect("hand back");
        self.check_alive(mark).await;
    }
}

/// tests/guest/strip-backing.awk, in Rust: drops every <backingStore>
/// element (self-closing or not) from a domain XML.
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

fn main() {
    // `cargo bench` passes --bench; nothing to filter here.
    let runs: usize = std::env::var("RAMSNAP_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(bench(runs));
}

async fn bench(runs: usize) {
    let env = Env::new(
        "bench",
        EnvOptions {
            uri: "qemu:///system",
            block_size: Some(8192 * MIB),
        },
    )
    .await;
    let dir = env.dir.path().join("virsh");
    std::fs::create_dir_all(&dir).unwrap();
    let events = PauseEvents::subscribe("qemu:///system").expect("libvirt lifecycle events");
    let mut b = Bench {
        env,
        vm: uuid::Uuid::new_v4().to_string(),
        spec: hpb::VmSpec::default(),
        token: String::new(),
        events,
        dir,
    };
    let disk = b.env.new_disk(false).await;
    b.spec = vm_spec(&b.vm, MEMORY_MIB, vec![disk], &format!("ramsnap.fill={FILL_MIB}"));
    eprintln!("booting a {MEMORY_MIB} MiB guest and filling {FILL_MIB} MiB of its RAM with random data...");
    let t = Instant::now();
    b.env.run(&b.spec, None).await.expect("boot");
    let lines = b.env.wait_ticks(&b.vm, 0, 1, Duration::from_secs(180)).await;
    assert!(lines.iter().any(|l| matches!(l, Line::Filled)), "{lines:?}");
    let Some(Line::Boot { token }) = lines.first().cloned() else {
        panic!("{lines:?}")
    };
    b.token = token;
    eprintln!("guest up and filled in {:.1} s", t.elapsed().as_secs_f64());

    let names = [
        "ramsnap LIVE (FILE)",
        "ramsnap PAUSED (FILE)",
        "ramsnap LIVE (BLOCK)",
        "ramsnap PAUSED (BLOCK)",
        "virsh --live",
        "virsh (not live)",
    ];
    let mut snap: Vec<Samples> = names.iter().map(|_| Samples::default()).collect();
    let mut restore: Vec<Samples> = names.iter().map(|_| Samples::default()).collect();
    let mut pause: Vec<Samples> = names.iter().map(|_| Samples::default()).collect();
    let mut checksum: Vec<Samples> = names.iter().map(|_| Samples::default()).collect();
    for run in 0..runs {
        for (i, (live, block)) in [(true, false), (false, false), (true, true), (false, true)]
            .into_iter()
            .enumerate()
        {
            let (s, r, p, c) = b.ramsnap(live, block).await;
            eprintln!(
                "run {run}: {}: snapshot {s:.2} s (checksum {c:.2} s), restore {r:.2} s, pause {p:.0} ms",
                names[i]
            );
            snap[i].push(s);
            restore[i].push(r);
            pause[i].push(p);
            checksum[i].push(c);
        }
        // The last ramsnap memory, to give the guest back to the agent.
        let frozen = b.leaf();
        let overlay = b.env.child_of(&frozen).await;
        let memory = b.env.memory_volumes(false, MEMORY_MIB * MIB, false).await;
        let req = hpb::SnapshotVmRequest {
            job_id: uuid::Uuid::new_v4().to_string(),
            vm_id: b.vm.clone(),
            snapshot_id: uuid::Uuid::new_v4().to_string(),
            disks: vec![hpb::SnapshotDisk {
                current: Some(frozen.clone()),
                overlay: Some(overlay.clone()),
            }],
            memory: Some(memory.clone()),
            mode: hpb::SnapshotMode::Paused as i32,
            compatibility_version: "3.3".into(),
        };
        snapshot(&mut b.env.host, req)
            .await
            .1
            .expect("snapshot for the hand-back");
        b.spec.disks[0].volume = Some(overlay);
        for (i, live) in [(4, true), (5, false)] {
            if !live {
                // The previous virsh restore left the guest under libvirt
                // alone: give it back to the agent first.
                b.hand_back(&memory, &frozen).await;
            }
            let (s, r, p) = b.virsh(live, run).await;
            eprintln!(
                "run {run}: {}: snapshot {s:.2} s, restore {r:.2} s, pause {p:.0} ms",
                names[i]
            );
            snap[i].push(s);
            restore[i].push(r);
            pause[i].push(p);
        }
        b.hand_back(&memory, &frozen).await;
    }
    b.env.stop(&b.vm, 0).await;

    let virsh_of = |i: usize| if i.is_multiple_of(2) { 4 } else { 5 };
    println!();
    println!(
        "1 GiB TCG guest, {FILL_MIB} MiB of random data in RAM; medians of {runs} runs; ratio = ramsnap / virsh"
    );
    println!(
        "{:<24} {:>10} {:>8} {:>11} {:>8} {:>10} {:>12}",
        "", "snapshot", "ratio", "restore", "ratio", "pause", "(checksum)"
    );
    for i in 0..names.len() {
        let v = virsh_of(i);
        let (sr, rr) = if i < 4 {
            (
                format!("{:.2}", snap[i].median() / snap[v].median()),
                format!("{:.2}", restore[i].median() / restore[v].median()),
            )
        } else {
            ("-".into(), "-".into())
        };
        let c = if i < 4 {
            format!("({:.2} s)", checksum[i].median())
        } else {
            String::new()
        };
        println!(
            "{:<24} {:>8.2} s {:>8} {:>9.2} s {:>8} {:>7.0} ms {:>12}",
            names[i],
            snap[i].median(),
            sr,
            restore[i].median(),
            rr,
            pause[i].median(),
            c
        );
    }
    println!("ramsnap LIVE and PAUSED are compared with virsh --live and virsh without --live respectively.");
}
