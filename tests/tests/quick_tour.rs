//! A newcomer's first ten minutes: the README's run command
//! (`scripts/run-embedded.sh`), then the README's quick tour, its commands
//! run as written (names, not ids) against that embedded default, with the
//! real guest under libvirt, a BLOCK domain on a loop device and SQLite.
//!
//! The tour is read from README.md itself (the `sh` block after "Then,
//! from another shell"), so the README cannot drift from what works. Only
//! the first line changes: `ramsnap=...` points at this build's CLI with
//! this fixture's addresses and certificates.
use ramsnap_e2e::cluster::{destroy_domains, fixture_dir, LoopDevice};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the repository")
        .to_path_buf()
}

/// The tour: the command lines of the README's `sh` block after "Then, from
/// another shell", with `\` continuations joined.
fn tour_commands(readme: &str) -> Vec<String> {
    let from = readme
        .find("Then, from another shell")
        .expect("README.md has the quick tour");
    let rest = &readme[from..];
    let start = rest.find("```sh\n").expect("the tour's sh block") + "```sh\n".len();
    let end = start + rest[start..].find("```").expect("the tour's block ends");
    let mut commands = Vec::new();
    let mut line = String::new();
    for l in rest[start..end].lines() {
        match l.strip_suffix('\\') {
            Some(head) => {
                line.push_str(head);
                line.push(' ');
            }
            None => {
                line.push_str(l);
                if !line.trim().is_empty() {
                    commands.push(std::mem::take(&mut line));
                }
                line.clear();
            }
        }
    }
    commands
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// ramsnapd as the README starts it; stopped (SIGTERM) on drop.
struct Embedded {
    child: Child,
    log: PathBuf,
}

impl Drop for Embedded {
    fn drop(&mut self) {
        // SAFETY: kill(2) of our own child (exec'd ramsnapd keeps the pid).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_readme_quick_tour_runs_as_written() {
    let root = repo_root();
    let tour = tour_commands(&std::fs::read_to_string(root.join("README.md")).expect("README.md"));
    assert!(tour.len() >= 10, "the tour is {} lines: {tour:?}", tour.len());
    assert!(tour[0].starts_with("ramsnap="), "{tour:?}");

    let fixture = fixture_dir("quick-tour");
    let data = fixture.path().join("data");
    let (snapshot, storage, host, probes) = (free_port(), free_port(), free_port(), free_port());
    let log = fixture.path().join("run-embedded.log");
    let out = std::fs::File::create(&log).expect("the log file");
    let child = Command::new("bash")
        .arg(root.join("scripts/run-embedded.sh"))
        .args([
            "--run-dir",
            &fixture.path().join("run/storage").display().to_string(),
        ])
        .args([
            "--host-run-dir",
            &fixture.path().join("run/host").display().to_string(),
        ])
        .args(["--probe-listen", &format!("127.0.0.1:{probes}")])
        .env("RAMSNAP_DATA_DIR", &data)
        .env("RAMSNAP_BLOCK_SIZE", "6G")
        .env("RAMSNAP_SNAPSHOT_LISTEN", format!("127.0.0.1:{snapshot}"))
        .env("RAMSNAP_STORAGE_LISTEN", format!("127.0.0.1:{storage}"))
        .env("RAMSNAP_HOST_LISTEN", format!("127.0.0.1:{host}"))
        // The test command built the debug binaries already.
        .env("RAMSNAP_BUILD_PROFILE", "debug")
        .env("RAMSNAP_PREBUILT", "1")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("the log file"))
        .stderr(out)
        .spawn()
        .expect("bash scripts/run-embedded.sh");
    let embedded = Embedded { child, log };
    let marker = format!("{}/", fixture.path().display());
    let cli = format!(
        "{} --tls-dir {} --snapshot 127.0.0.1:{snapshot} --storage 127.0.0.1:{storage}",
        root.join("target/debug/ramsnap").display(),
        data.join("tls").display()
    );
    let result = std::panic::catch_unwind(|| run_tour(&tour, &cli, &embedded, probes));
    // Whatever happened: the guests, ramsnapd, then the loop device and its VG.
    destroy_domains(&[], &marker);
    let log_text = std::fs::read_to_string(&embedded.log).unwrap_or_default();
    drop(embedded);
    destroy_domains(&[], &marker);
    let block_file = data.join("block/default.img");
    for line in String::from_utf8_lossy(
        &Command::new("losetup")
            .arg("-j")
            .arg(&block_file)
            .output()
            .map(|o| o.stdout)
            .unwrap_or_default(),
    )
    .lines()
    {
        if let Some((dev, _)) = line.split_once(':') {
            drop(LoopDevice {
                device: PathBuf::from(dev),
            });
        }
    }
    if let Err(panic) = result {
        eprintln!("--- run-embedded.sh and ramsnapd:\n{log_text}");
        std::panic::resume_unwind(panic);
    }
}

/// GET /metrics on the probe port: the Prometheus text.
fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("the probe port");
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

/// The sum of a metric's samples whose labels contain each of `labels`.
fn sample(text: &str, metric: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")) || l.starts_with(&format!("{metric} ")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn run_tour(tour: &[String], cli: &str, embedded: &Embedded, probes: u16) {
    // The script builds nothing here; ramsnapd attaches the three domains
    // before it serves.
    let started = Instant::now();
    let domains = loop {
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!("{cli} -o json domain list"))
            .output()
            .expect("bash");
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        let log = std::fs::read_to_string(&embedded.log).unwrap_or_default();
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "ramsnapd did not answer within 120 s:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    for name in ["local-file", "local-block", "local-export"] {
        assert!(
            domains.contains(&format!("\"name\": \"{name}\"")),
            "{name} not attached: {domains}"
        );
    }

    let before = scrape(probes);
    let mut outputs = Vec::new();
    for command in &tour[1..] {
        let script = format!("set -euo pipefail\nramsnap='{cli}'\n{command}");
        let t = Instant::now();
        let out = Command::new("bash")
            .arg("-c")
            .arg(&script)
            .output()
            .expect("bash");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        eprintln!(
            "$ {command}\n{stdout}{stderr}({:.1} s)",
            t.elapsed().as_secs_f64()
        );
        assert!(
            out.status.success(),
            "the tour's command failed ({}): {command}\n{stdout}{stderr}",
            out.status
        );
        outputs.push((command.clone(), stdout));
    }
    let after = |prefix: &str| -> &str {
        outputs
            .iter()
            .rfind(|(c, _)| c.starts_with(prefix))
            .map(|(_, o)| o.as_str())
            .unwrap_or_else(|| panic!("no tour command starts with {prefix:?}"))
    };
    // The snapshot holds the memory (its MEMORY column), and the run after
    // the preview resumed the guest from it.
    let list = after("$ramsnap snapshot list demo");
    assert!(
        list.lines()
            .any(|l| l.contains("before upgrade") && l.contains("yes")),
        "{list}"
    );
    let run = after("$ramsnap vm run demo");
    assert!(run.contains("is up"), "{run}");
    let exported = after("$ramsnap vm exported");
    assert!(exported.contains("demo"), "{exported}");
    let vms = Command::new("bash")
        .arg("-c")
        .arg(format!("{cli} -o json vm list"))
        .output()
        .expect("bash");
    let vms = String::from_utf8_lossy(&vms.stdout);
    assert!(vms.contains("\"name\": \"demo-copy\""), "{vms}");

    // The metrics moved with the tour: its RPCs, its sagas, the memory
    // dump, the guest's pause, the restore, the export's copies; the VMs by
    // status.
    let after = scrape(probes);
    let moved = |metric: &str, labels: &[&str]| {
        let (b, a) = (sample(&before, metric, labels), sample(&after, metric, labels));
        assert!(a > b, "{metric}{labels:?} did not move ({b} then {a}):\n{after}");
    };
    moved(
        "ramsnap_rpc_server_duration_seconds_count",
        &[
            "rpc_method=\"/ramsnap.snapshot.v1.SnapshotService/CreateSnapshot\"",
            "rpc_grpc_status_code=\"0\"",
        ],
    );
    moved(
        "ramsnap_rpc_server_duration_seconds_count",
        &["rpc_method=\"/ramsnap.host.v1.HostService/SnapshotVm\""],
    );
    moved(
        "ramsnap_saga_duration_seconds_count",
        &["saga=\"snapshot_create\"", "outcome=\"succeeded\""],
    );
    moved(
        "ramsnap_saga_duration_seconds_count",
        &["saga=\"vm_import\"", "outcome=\"succeeded\""],
    );
    moved("ramsnap_memory_dumped_bytes_total", &[]);
    moved("ramsnap_guest_pause_seconds_count", &["mode=\"paused\""]);
    moved("ramsnap_memory_restore_duration_seconds_count", &[]);
    moved("ramsnap_volume_copied_bytes_total", &[]);
    // The VM count is retaken a second after the last change.
    std::thread::sleep(Duration::from_secs(3));
    let vms = scrape(probes);
    assert!(sample(&vms, "ramsnap_vms", &["status=\"Down\""]) >= 2.0, "{vms}");

    // The Python client's example, the specification's flow, against the
    // same services.
    python_example(cli, &domains);
}

/// `clients/python/example.py` against the embedded default: it exits 0
/// only when the run after the commit resumed the guest from its memory.
fn python_example(cli: &str, domains: &str) {
    let root = repo_root();
    let generated = Command::new("bash")
        .arg(root.join("clients/python/generate.sh"))
        .output()
        .expect("bash");
    assert!(
        generated.status.success(),
        "clients/python/generate.sh: {}",
        String::from_utf8_lossy(&generated.stderr)
    );
    let list: serde_json::Value = serde_json::from_str(domains).expect("domain list JSON");
    let domain = list
        .as_array()
        .and_then(|a| a.iter().find(|d| d["name"] == "local-file"))
        .and_then(|d| d["domain_id"].as_str())
        .expect("local-file's id")
        .to_string();
    // "<ramsnap> --tls-dir DIR --snapshot ADDR --storage ADDR"
    let words: Vec<&str> = cli.split_whitespace().collect();
    let after = |flag: &str| words[words.iter().position(|w| *w == flag).expect(flag) + 1];
    let out = Command::new("/usr/bin/python3")
        .arg(root.join("clients/python/example.py"))
        .args(["--target", after("--snapshot"), "--tls-dir", after("--tls-dir")])
        .args(["--domain-id", &domain])
        .env("PYTHONPATH", root.join("clients/python"))
        .output()
        .expect("/usr/bin/python3");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("$ python3 clients/python/example.py\n{text}");
    assert!(out.status.success(), "the Python example failed:\n{text}");
    assert!(
        text.contains("VM_STATUS_RESTORING_STATE -> VM_STATUS_UP"),
        "{text}"
    );
}

#[test]
fn the_tour_is_read_whole_from_the_readme() {
    let text = "x\nThen, from another shell:\n\n```sh\nramsnap=a\n$ramsnap one \\\n    two\n\n$ramsnap three\n```\n```sh\nno\n```";
    assert_eq!(
        tour_commands(text),
        ["ramsnap=a", "$ramsnap one      two", "$ramsnap three"]
    );
}
