//! Real storage for tests: a FILE domain in a temporary directory and a
//! BLOCK domain on a loop device over a sparse file (real LVM2 metadata),
//! served over real gRPC on 127.0.0.1. Everything is torn down on drop:
//! the VG, the PV, every loop device over it, the files.
#![allow(dead_code)]
use ramsnap_common::server::{self, ServiceSet};
use ramsnap_proto::common::v1::VolumeRef;
use ramsnap_proto::storage::v1 as pb;
use ramsnap_proto::storage::v1::storage_service_client::StorageServiceClient;
use ramsnap_storage::service::{StorageApi, MAX_MESSAGE_BYTES, SERVICE_NAME};
use ramsnap_storage::{Config, Storage};
use std::path::{Path, PathBuf};
use std::process::Command;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tonic::transport::Channel;

pub const MIB: u64 = 1024 * 1024;

pub struct LoopDevice {
    pub device: PathBuf,
    _file: PathBuf,
}

impl LoopDevice {
    pub fn new(dir: &Path, size: u64) -> LoopDevice {
        let file = dir.join("pv.img");
        std::fs::File::create(&file).unwrap().set_len(size).unwrap();
        // Direct I/O to the file, as a PV on a real device has no page
        // cache beneath it (see the storage agent's loop attach).
        let out = Command::new("losetup")
            .args(["--direct-io=on", "--find", "--show"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let device = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        LoopDevice { device, _file: file }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let dev = self.device.display().to_string();
        // Loop devices made over this PV to reach LVs (prepare).
        for entry in std::fs::read_dir("/sys/block").unwrap().flatten() {
            let backing = entry.path().join("loop/backing_file");
            if std::fs::read_to_string(&backing)
                .map(|b| b.trim() == dev)
                .unwrap_or(false)
            {
                let _ = Command::new("losetup")
                    .arg("-d")
                    .arg(format!("/dev/{}", entry.file_name().to_string_lossy()))
                    .status();
            }
        }
        let cfg = ["--config", "global { activation = 0 }"];
        let vgs = Command::new("pvs")
            .args(cfg)
            .args(["--noheadings", "-o", "vg_name"])
            .arg(&dev)
            .output();
        if let Ok(out) = vgs {
            let vg = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if !vg.is_empty() {
                let _ = Command::new("vgremove")
                    .args(cfg)
                    .args(["-f", &vg])
                    .env("LVM_SUPPRESS_FD_WARNINGS", "1")
                    .output();
            }
        }
        let _ = Command::new("pvremove")
            .args(cfg)
            .args(["-ff", "-y", &dev])
            .env("LVM_SUPPRESS_FD_WARNINGS", "1")
            .output();
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

/// A storage service on real domains, reachable over gRPC.
pub struct Env {
    pub dir: TempDir,
    pub loop_dev: LoopDevice,
    pub client: StorageServiceClient<Channel>,
    pub file_domain: String,
    pub block_domain: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Env {
    pub fn config(&self) -> Config {
        config_for(self.dir.path(), &self.loop_dev.device)
    }

    pub async fn new(block_size: u64) -> Env {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("roots/nfs1")).unwrap();
        let loop_dev = LoopDevice::new(dir.path(), block_size);
        let config = config_for(dir.path(), &loop_dev.device);
        let (client, stop, task) = start(config).await;
        let mut env = Env {
            dir,
            loop_dev,
            client,
            file_domain: String::new(),
            block_domain: String::new(),
            stop: Some(stop),
            task: Some(task),
        };
        env.file_domain = env
            .register(
                "files",
                pb::DomainType::File,
                &env.dir.path().join("roots/nfs1").display().to_string(),
            )
            .await
            .domain_id;
        env.block_domain = env
            .register(
                "luns",
                pb::DomainType::Block,
                &env.loop_dev.device.display().to_string(),
            )
            .await
            .domain_id;
        env
    }

    pub async fn register(&mut self, name: &str, kind: pb::DomainType, location: &str) -> pb::StorageDomain {
        self.client
            .register_domain(pb::RegisterDomainRequest {
                domain_id: String::new(),
                name: name.into(),
                r#type: kind as i32,
                location: location.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .domain
            .unwrap()
    }

    /// Stops the server and starts a fresh one on the same directories.
    pub async fn restart(&mut self, config: Config) {
        self.stop.take().map(|s| s.send(()));
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
        let (client, stop, task) = start(config).await;
        self.client = client;
        self.stop = Some(stop);
        self.task = Some(task);
    }

    pub fn domain(&self, kind: pb::DomainType) -> String {
        match kind {
            pb::DomainType::File => self.file_domain.clone(),
            _ => self.block_domain.clone(),
        }
    }

    pub async fn create(&mut self, req: pb::CreateVolumeRequest) -> Result<pb::Volume, tonic::Status> {
        self.client
            .create_volume(req)
            .await
            .map(|r| r.into_inner().volume.unwrap())
    }

    pub async fn list(&mut self, domain: &str) -> Vec<pb::Volume> {
        self.client
            .list_volumes(pb::ListVolumesRequest {
                domain_id: domain.into(),
                image_id: String::new(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .volumes
    }

    pub async fn prepare(&mut self, r: &VolumeRef) -> PathBuf {
        PathBuf::from(
            self.client
                .prepare_volume(pb::PrepareVolumeRequest {
                    r#ref: Some(r.clone()),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .path,
        )
    }

    pub async fn teardown(&mut self, r: &VolumeRef) {
        self.client
            .teardown_volume(pb::TeardownVolumeRequest {
                r#ref: Some(r.clone()),
            })
            .await
            .unwrap();
    }

    /// Runs a copy to its end; returns the progress messages' processed
    /// counts and the new volume.
    pub async fn copy(
        &mut self,
        req: pb::CopyVolumeRequest,
    ) -> Result<(Vec<u64>, pb::Volume), tonic::Status> {
        let mut stream = self.client.copy_volume(req).await?.into_inner();
        let mut seen = Vec::new();
        while let Some(msg) = stream.message().await? {
            seen.push(msg.progress.as_ref().map(|p| p.processed_bytes).unwrap_or(0));
            if let Some(v) = msg.volume {
                return Ok((seen, v));
            }
        }
        panic!("copy stream ended without a volume");
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.stop.take().map(|s| s.send(()));
    }
}

pub fn config_for(dir: &Path, device: &Path) -> Config {
    Config {
        state_dir: dir.join("state"),
        run_dir: dir.join("run"),
        file_roots: vec![dir.join("roots")],
        block_devices: vec![device.to_path_buf()],
    }
}

async fn start(
    config: Config,
) -> (
    StorageServiceClient<Channel>,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let storage = Storage::open(config).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let set = ServiceSet::new(SERVICE_NAME, StorageApi::new(storage).into_server());
    let task = tokio::spawn(async move {
        server::serve(listener, vec![set], async move {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    // Large enough for a whole VM descriptor, as the server accepts.
    let client = StorageServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    (client, tx, task)
}

pub fn new_volume(domain: &str, capacity: u64, format: pb::VolumeFormat) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        domain_id: domain.into(),
        capacity_bytes: capacity,
        format: format as i32,
        purpose: pb::VolumePurpose::Disk as i32,
        ..Default::default()
    }
}

pub fn field_of(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .bad_request()
        .and_then(|b| b.field_violations.first().map(|f| f.field.clone()))
        .unwrap_or_default()
}

/// LV names in a VG, straight from LVM.
pub fn lv_names(vg: &str) -> Vec<String> {
    let out = Command::new("lvs")
        .args([
            "--config",
            "global { activation = 0 }",
            "--noheadings",
            "-o",
            "lv_name",
            vg,
        ])
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(String::from)
        .collect()
}

/// Loop devices currently over `pv` (prepared BLOCK volumes).
pub fn loops_over(pv: &Path) -> usize {
    let dev = pv.display().to_string();
    std::fs::read_dir("/sys/block")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("loop/backing_file"))
                .map(|b| b.trim() == dev)
                .unwrap_or(false)
        })
        // A detach asked for while another process had the device open
        // (another test's LVM scan) happens at its last close: the kernel
        // marks it autoclear meanwhile. It is released.
        .filter(|e| {
            std::fs::read_to_string(e.path().join("loop/autoclear")).map_or(true, |a| a.trim() != "1")
        })
        .count()
}

/// The first precondition violation's (type, subject).
pub fn precondition_of(status: &tonic::Status) -> (String, String) {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .precondition_failure()
        .and_then(|p| {
            p.violations
                .first()
                .map(|v| (v.r#type.clone(), v.subject.clone()))
        })
        .unwrap_or_default()
}

/// The ResourceInfo's (type, name) of a NOT_FOUND.
pub fn resource_of(status: &tonic::Status) -> (String, String) {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .resource_info()
        .map(|r| (r.resource_type.clone(), r.resource_name.clone()))
        .unwrap_or_default()
}

/// Runs qemu-img (or qemu-io) and returns its stdout; fails the test on error.
pub fn qemu(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Bytes a qcow2 image's own layer holds (depth 0 in `qemu-img map`), data
/// and zero clusters alike: what is not read from its backing chain.
pub fn own_layer_bytes(path: &Path) -> u64 {
    let map = qemu(&[
        "qemu-img",
        "map",
        "-f",
        "qcow2",
        "--output=json",
        path.to_str().unwrap(),
    ]);
    let map: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
    map.iter()
        .filter(|e| e["depth"] == 0 && (e["data"] == true || e["zero"] == true))
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

/// The backing file name recorded in a qcow2 header ("" for none).
pub fn backing_name(path: &Path) -> String {
    let info = qemu(&["qemu-img", "info", "-U", "--output=json", path.to_str().unwrap()]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    info["backing-filename"].as_str().unwrap_or_default().to_string()
}

/// First physical extent of an LV (its single contiguous segment).
pub fn lv_first_pe(vg: &str, lv: &str) -> u64 {
    let out = Command::new("lvs")
        .args([
            "--config",
            "global { activation = 0 }",
            "--noheadings",
            "-o",
            "seg_pe_ranges",
            &format!("{vg}/{lv}"),
        ])
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .output()
        .unwrap();
    let ranges = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // "/dev/loop3:10-25"
    ranges
        .rsplit(':')
        .next()
        .and_then(|r| r.split('-').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no extents for {vg}/{lv}: {ranges:?}"))
}

/// A block device node under /dev whose driver does not exist: it can be
/// stat'ed (a block device) but not opened (ENXIO), so every probe of it
/// fails. Removed on drop.
pub struct DeadDevice {
    pub path: PathBuf,
}

impl DeadDevice {
    pub fn new() -> DeadDevice {
        // A major number no block driver registered (the local/experimental
        // range, minus what /proc/devices lists).
        let devices = std::fs::read_to_string("/proc/devices").unwrap();
        let used: Vec<u32> = devices
            .split("Block devices:")
            .nth(1)
            .unwrap_or("")
            .lines()
            .filter_map(|l| l.split_whitespace().next().and_then(|n| n.parse().ok()))
            .collect();
        let major = (240..=250)
            .find(|m| !used.contains(m))
            .expect("a free major number");
        let path = PathBuf::from(format!(
            "/dev/ramsnap-test-dead-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        let st = Command::new("mknod")
            .arg(&path)
            .args(["b", &major.to_string(), "0"])
            .status()
            .unwrap();
        assert!(st.success(), "mknod {}", path.display());
        DeadDevice { path }
    }
}

impl Drop for DeadDevice {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The ErrorInfo's reason and the ResourceInfo's name of a status.
pub fn error_info_of(status: &tonic::Status) -> (String, String) {
    use tonic_types::StatusExt;
    let d = status.get_error_details();
    (
        d.error_info().map(|e| e.reason.clone()).unwrap_or_default(),
        d.resource_info()
            .map(|r| r.resource_name.clone())
            .unwrap_or_default(),
    )
}

/// [`loops_over`], once it is `want` or 5 s have passed: a loop device
/// that something else has open (LVM scanning every block device, say)
/// is detached lazily, when that closes it.
pub fn settled_loops_over(pv: &Path, want: usize) -> usize {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let n = loops_over(pv);
        if n == want || std::time::Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Whether a prepared BLOCK volume's path (a symlink to a loop device)
/// still leads to a loop device bound over `pv`.
pub fn bound_over(link: &Path, pv: &Path) -> bool {
    let Ok(target) = std::fs::read_link(link) else {
        return false;
    };
    let name = target.file_name().unwrap().to_string_lossy().into_owned();
    std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
        .is_ok_and(|b| b.trim() == pv.display().to_string())
}
