//! Real parts for the host's tests: a StorageService on a FILE domain (a
//! temporary directory) and a BLOCK domain (LVM2 on a loop device over a
//! sparse file), a HostService on libvirt, both served over real gRPC on
//! 127.0.0.1, the test guest built from Debian packages, and helpers that
//! read its console-log contract. Everything a test makes is undone on drop,
//! also when it fails: its domains (by a per-test name prefix) and their
//! QEMU logs, the loop devices and VG, the files.
#![allow(dead_code)]
use ramsnap_common::server::{self, ServiceSet};
use ramsnap_host::service::{HostApi, SERVICE_NAME as HOST_SERVICE};
use ramsnap_host::{Config as HostConfig, Host};
use ramsnap_proto::common::v1 as common;
use ramsnap_proto::host::v1 as hpb;
use ramsnap_proto::host::v1::host_service_client::HostServiceClient;
use ramsnap_proto::storage::v1 as spb;
use ramsnap_proto::storage::v1::storage_service_client::StorageServiceClient;
use ramsnap_storage::service::{StorageApi, SERVICE_NAME as STORAGE_SERVICE};
use ramsnap_storage::{Config as StorageConfig, Storage};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tokio::sync::{oneshot, Semaphore};
use tonic::transport::Channel;

pub const MIB: u64 = 1024 * 1024;

/// Two cores: at most two TCG guests at once, whatever the test threads.
pub static GUESTS: Semaphore = Semaphore::const_new(2);

pub struct LoopDevice {
    pub device: PathBuf,
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
        LoopDevice {
            device: PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()),
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let dev = self.device.display().to_string();
        // Loop devices made over this PV to reach LVs (prepare).
        for _ in 0..3 {
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
            if loops_over(&self.device) == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let cfg = ["--config", "global { activation = 0 }"];
        if let Ok(out) = Command::new("pvs")
            .args(cfg)
            .args(["--noheadings", "-o", "vg_name"])
            .arg(&dev)
            .env("LVM_SUPPRESS_FD_WARNINGS", "1")
            .output()
        {
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

/// The libvirt domains whose name starts with `prefix`.
pub fn domains_with_prefix(prefix: &str) -> Vec<String> {
    let out = Command::new("virsh")
        .args(["-c", "qemu:///system", "list", "--all", "--name"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|n| n.starts_with(prefix))
        .map(String::from)
        .collect()
}

/// Destroys (and undefines, should one be defined) every domain with the
/// prefix, and removes libvirt's per-domain QEMU logs.
pub struct DomainGuard {
    pub prefix: String,
    pub uri: String,
}

impl Drop for DomainGuard {
    fn drop(&mut self) {
        if self.uri != "qemu:///system" {
            return;
        }
        for name in domains_with_prefix(&self.prefix) {
            let _ = Command::new("virsh")
                .args(["-c", &self.uri, "destroy", &name])
                .output();
            let _ = Command::new("virsh")
                .args(["-c", &self.uri, "undefine", &name])
                .output();
            let _ = std::fs::remove_file(format!("/var/log/libvirt/qemu/{name}.log"));
        }
        if let Ok(dir) = std::fs::read_dir("/var/log/libvirt/qemu") {
            for e in dir.flatten() {
                if e.file_name().to_string_lossy().starts_with(&self.prefix) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

/// Builds the test guest once per test binary (fast when unchanged).
pub fn guest_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let out = root.join("target/ramsnap-guest");
        let status = Command::new("bash")
            .arg(root.join("tests/guest/build.sh"))
            .arg(&out)
            .output()
            .expect("running tests/guest/build.sh");
        assert!(
            status.status.success(),
            "guest build failed: {}",
            String::from_utf8_lossy(&status.stderr)
        );
        out.canonicalize().unwrap()
    })
}

struct Server {
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Server {
    async fn start(set: ServiceSet) -> (Server, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server::serve(listener, vec![set], async move {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        (
            Server {
                stop: Some(tx),
                task: Some(task),
            },
            addr,
        )
    }

    async fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

pub struct EnvOptions {
    pub uri: &'static str,
    /// Size of the BLOCK domain's PV; None: no BLOCK domain.
    pub block_size: Option<u64>,
}

/// A storage service and a host service on real parts.
pub struct Env {
    // Drop order: domains first (they hold the volumes open), then the
    // servers, then the loop devices, then the files.
    _domains: DomainGuard,
    host_server: Server,
    storage_server: Server,
    pub host: HostServiceClient<Channel>,
    /// http://127.0.0.1:PORT of the host service.
    pub host_addr: String,
    pub storage: StorageServiceClient<Channel>,
    pub file_domain: String,
    pub block_domain: String,
    pub loop_dev: Option<LoopDevice>,
    pub prefix: String,
    pub boot_dir: PathBuf,
    pub run_dir: PathBuf,
    pub dir: TempDir,
    pub host_config: HostConfig,
}

impl Env {
    pub async fn new(test: &str, opts: EnvOptions) -> Env {
        if std::env::var_os("RUST_LOG").is_some() {
            std::mem::forget(ramsnap_common::telemetry::init("host-test"));
        }
        let dir = tempfile::tempdir().unwrap();
        let prefix = format!("rsh-{test}-{}-", &uuid::Uuid::new_v4().simple().to_string()[..6]);
        let domains = DomainGuard {
            prefix: prefix.clone(),
            uri: opts.uri.to_string(),
        };
        std::fs::create_dir_all(dir.path().join("roots/nfs1")).unwrap();
        let loop_dev = opts.block_size.map(|s| LoopDevice::new(dir.path(), s));
        let storage = Storage::open(StorageConfig {
            state_dir: dir.path().join("storage-state"),
            run_dir: dir.path().join("storage-run"),
            file_roots: vec![dir.path().join("roots")],
            block_devices: loop_dev.iter().map(|l| l.device.clone()).collect(),
        })
        .await
        .unwrap();
        let (storage_server, storage_addr) = Server::start(ServiceSet::new(
            STORAGE_SERVICE,
            StorageApi::new(storage).into_server(),
        ))
        .await;
        let storage = StorageServiceClient::connect(storage_addr.clone()).await.unwrap();

        let boot_dir = dir.path().join("boot");
        std::fs::create_dir_all(&boot_dir).unwrap();
        if opts.uri.starts_with("qemu") {
            for f in ["vmlinux", "initramfs.img"] {
                std::os::unix::fs::symlink(guest_dir().join(f), boot_dir.join(f)).unwrap();
            }
        }
        let run_dir = dir.path().join("host-run");
        let mut host_config = HostConfig::new(
            opts.uri,
            &storage_addr,
            boot_dir.clone(),
            run_dir.clone(),
            dir.path().join("host-state"),
        );
        host_config.domain_prefix = prefix.clone();
        // A watch opened before the run (as the guest tests do) sees the
        // run; one of a VM never run ends soon.
        host_config.unknown_watch_wait = std::time::Duration::from_secs(2);
        let host = Host::open(host_config.clone()).await.unwrap();
        let (host_server, host_addr) =
            Server::start(ServiceSet::new(HOST_SERVICE, HostApi::new(host).into_server())).await;
        let host = HostServiceClient::connect(host_addr.clone()).await.unwrap();

        let mut env = Env {
            _domains: domains,
            host_server,
            storage_server,
            host,
            host_addr,
            storage,
            file_domain: String::new(),
            block_domain: String::new(),
            loop_dev,
            prefix,
            boot_dir,
            run_dir,
            dir,
            host_config,
        };
        let files = env.dir.path().join("roots/nfs1").display().to_string();
        env.file_domain = env.register("files", spb::DomainType::File, &files).await;
        if let Some(dev) = env.loop_dev.as_ref().map(|l| l.device.display().to_string()) {
            env.block_domain = env.register("luns", spb::DomainType::Block, &dev).await;
        }
        env
    }

    async fn register(&mut self, name: &str, kind: spb::DomainType, location: &str) -> String {
        self.storage
            .register_domain(spb::RegisterDomainRequest {
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
            .domain_id
    }

    /// A channel of its own to the host service.
    pub async fn host_channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(self.host_addr.clone())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// Stops the host server (the storage server keeps running).
    pub async fn stop_host_server(&mut self) {
        self.host_server.shutdown().await;
    }

    pub fn domain(&self, block: bool) -> String {
        if block {
            self.block_domain.clone()
        } else {
            self.file_domain.clone()
        }
    }

    pub fn domain_name(&self, vm: &str) -> String {
        format!("{}{}", self.prefix, vm)
    }

    pub async fn create_volume(&mut self, req: spb::CreateVolumeRequest) -> spb::Volume {
        self.storage
            .create_volume(req)
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
    }

    /// A standalone qcow2 disk (a new image).
    pub async fn new_disk(&mut self, block: bool) -> common::VolumeRef {
        let domain = self.domain(block);
        self.create_volume(spb::CreateVolumeRequest {
            domain_id: domain,
            capacity_bytes: 64 * MIB,
            format: spb::VolumeFormat::Cow as i32,
            purpose: spb::VolumePurpose::Disk as i32,
            ..Default::default()
        })
        .await
        .r#ref
        .unwrap()
    }

    /// A COW child of `parent` in its image (an overlay).
    pub async fn child_of(&mut self, parent: &common::VolumeRef) -> common::VolumeRef {
        self.create_volume(spb::CreateVolumeRequest {
            domain_id: parent.domain_id.clone(),
            image_id: parent.image_id.clone(),
            capacity_bytes: 64 * MIB,
            format: spb::VolumeFormat::Cow as i32,
            purpose: spb::VolumePurpose::Disk as i32,
            parent_volume_id: parent.volume_id.clone(),
            ..Default::default()
        })
        .await
        .r#ref
        .unwrap()
    }

    pub async fn delete_volume(&mut self, r: &common::VolumeRef) {
        self.storage
            .delete_volume(spb::DeleteVolumeRequest {
                request_id: String::new(),
                r#ref: Some(r.clone()),
            })
            .await
            .unwrap();
    }

    pub async fn memory_volumes(&mut self, block: bool, memory: u64, live: bool) -> common::MemoryVolumeRef {
        let domain = self.domain(block);
        let r = self
            .storage
            .create_memory_volumes(spb::CreateMemoryVolumesRequest {
                request_id: String::new(),
                domain_id: domain,
                memory_bytes: memory,
                mode: if live {
                    spb::MemoryDumpMode::Live
                } else {
                    spb::MemoryDumpMode::Paused
                } as i32,
                description: "test".into(),
            })
            .await
            .unwrap()
            .into_inner();
        common::MemoryVolumeRef {
            dump: r.dump.unwrap().r#ref,
            metadata: r.metadata.unwrap().r#ref,
        }
    }

    /// The path the storage service gives for a volume (prepares it).
    pub async fn path_of(&mut self, r: &common::VolumeRef) -> PathBuf {
        PathBuf::from(
            self.storage
                .prepare_volume(spb::PrepareVolumeRequest {
                    r#ref: Some(r.clone()),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .path,
        )
    }

    /// Copies a volume to `domain` under the same image and volume ids
    /// (what an export or import does) and waits for the copy's end.
    pub async fn copy_same_ids(&mut self, source: &common::VolumeRef, domain: &str) -> common::VolumeRef {
        let mut stream = self
            .storage
            .copy_volume(spb::CopyVolumeRequest {
                request_id: uuid::Uuid::new_v4().to_string(),
                source: Some(source.clone()),
                target_domain_id: domain.into(),
                target_image_id: source.image_id.clone(),
                target_volume_id: source.volume_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        while let Some(m) = stream.message().await.unwrap() {
            if let Some(v) = m.volume {
                let r = v.r#ref.unwrap();
                assert_eq!((&r.image_id, &r.volume_id), (&source.image_id, &source.volume_id));
                return r;
            }
        }
        panic!("the copy of {source:?} ended without a volume")
    }

    /// The first `len` bytes of a volume (prepared, read, torn down).
    pub async fn volume_bytes(&mut self, r: &common::VolumeRef, len: u64) -> Vec<u8> {
        use std::io::Read;
        let path = self.path_of(r).await;
        let mut buf = Vec::new();
        std::fs::File::open(&path)
            .unwrap()
            .take(len)
            .read_to_end(&mut buf)
            .unwrap();
        self.teardown(r).await;
        buf
    }

    /// Flips bits of the byte at `at` of a volume (prepared, written with
    /// fsync, torn down); bytes past a file's end read as zeros.
    pub async fn flip_byte(&mut self, r: &common::VolumeRef, at: u64) {
        use std::os::unix::fs::FileExt;
        let path = self.path_of(r).await;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut b = [0u8];
        let n = f.read_at(&mut b, at).unwrap();
        if n == 0 {
            b[0] = 0;
        }
        f.write_at(&[b[0] ^ 0x40], at).unwrap();
        f.sync_all().unwrap();
        drop(f);
        self.teardown(r).await;
    }

    /// Writes `bytes` at `at` of a volume (prepared, written with fsync,
    /// torn down).
    pub async fn write_bytes(&mut self, r: &common::VolumeRef, at: u64, bytes: &[u8]) {
        use std::os::unix::fs::FileExt;
        let path = self.path_of(r).await;
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(bytes, at).unwrap();
        f.sync_all().unwrap();
        drop(f);
        self.teardown(r).await;
    }

    pub async fn verify_memory(
        &mut self,
        req: hpb::VerifyMemoryRequest,
    ) -> Result<hpb::VerifyMemoryResponse, tonic::Status> {
        self.host.verify_memory(req).await.map(|r| r.into_inner())
    }

    pub async fn teardown(&mut self, r: &common::VolumeRef) {
        self.storage
            .teardown_volume(spb::TeardownVolumeRequest {
                r#ref: Some(r.clone()),
            })
            .await
            .unwrap();
    }

    pub async fn run(
        &mut self,
        spec: &hpb::VmSpec,
        restore: Option<common::MemoryVolumeRef>,
    ) -> Result<hpb::VmStatus, tonic::Status> {
        self.host
            .run_vm(hpb::RunVmRequest {
                spec: Some(spec.clone()),
                restore_memory: restore,
            })
            .await
            .map(|r| r.into_inner().status())
    }

    pub async fn stop(&mut self, vm: &str, graceful_secs: u32) -> bool {
        self.host
            .stop_vm(hpb::StopVmRequest {
                vm_id: vm.into(),
                graceful_timeout_seconds: graceful_secs,
            })
            .await
            .unwrap()
            .into_inner()
            .graceful
    }

    pub async fn status(&mut self, vm: &str) -> hpb::VmStatus {
        self.host
            .get_vm_status(hpb::GetVmStatusRequest { vm_id: vm.into() })
            .await
            .unwrap()
            .into_inner()
            .status()
    }

    /// The whole console log of a VM, through ReadConsole.
    pub async fn console(&mut self, vm: &str) -> String {
        let mut out = Vec::new();
        let mut offset = 0;
        loop {
            let r = self
                .host
                .read_console(hpb::ReadConsoleRequest {
                    vm_id: vm.into(),
                    offset,
                    max_bytes: 0,
                })
                .await
                .unwrap()
                .into_inner();
            if r.data.is_empty() {
                break;
            }
            out.extend_from_slice(&r.data);
            offset = r.next_offset;
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Waits until the console has `n` TICK lines after byte `from`.
    pub async fn wait_ticks(&mut self, vm: &str, from: usize, n: usize, timeout: Duration) -> Vec<Line> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.console(vm).await;
            let lines = parse(&log[from.min(log.len())..]);
            if lines.iter().filter(|l| matches!(l, Line::Tick { .. })).count() >= n {
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "no {n} ticks within {timeout:?}; console after {from}:\n{}",
                &log[from.min(log.len())..]
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The disks the domain runs on now, as libvirt says: (dev, source).
    pub fn live_disks(&self, vm: &str) -> Vec<(String, String)> {
        let out = Command::new("virsh")
            .args(["-c", "qemu:///system", "domblklist", &self.domain_name(vm)])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "domblklist: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(2)
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                Some((it.next()?.to_string(), it.next()?.to_string()))
            })
            .collect()
    }

    pub fn domain_exists(&self, vm: &str) -> bool {
        domains_with_prefix(&self.prefix).contains(&self.domain_name(vm))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    Boot { token: String },
    Filled,
    Tick { token: String, counter: u64 },
    Mismatch(String),
    Error(String),
}

/// The guest's console-log contract lines (README of tests/guest).
pub fn parse(log: &str) -> Vec<Line> {
    log.lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter_map(|l| {
            if let Some(t) = l.strip_prefix("RAMSNAP-BOOT token=") {
                Some(Line::Boot { token: t.to_string() })
            } else if let Some(rest) = l.strip_prefix("RAMSNAP-TICK token=") {
                let (token, counter) = rest.split_once(" counter=")?;
                Some(Line::Tick {
                    token: token.to_string(),
                    counter: counter.parse().ok()?,
                })
            } else if l.starts_with("RAMSNAP-FILLED") {
                Some(Line::Filled)
            } else if l.starts_with("RAMSNAP-DISK-MISMATCH") {
                Some(Line::Mismatch(l.to_string()))
            } else if l.starts_with("RAMSNAP-ERROR") {
                Some(Line::Error(l.to_string()))
            } else {
                None
            }
        })
        .collect()
}

pub fn ticks(lines: &[Line]) -> Vec<(String, u64)> {
    lines
        .iter()
        .filter_map(|l| match l {
            Line::Tick { token, counter } => Some((token.clone(), *counter)),
            _ => None,
        })
        .collect()
}

pub fn vm_spec(vm: &str, memory_mib: u64, disks: Vec<common::VolumeRef>, cmdline_extra: &str) -> hpb::VmSpec {
    hpb::VmSpec {
        vm_id: vm.into(),
        name: format!("test-{}", &vm[..8]),
        memory_bytes: memory_mib * MIB,
        vcpus: 1,
        disks: disks
            .into_iter()
            .map(|v| hpb::DiskSpec { volume: Some(v) })
            .collect(),
        kernel: "vmlinux".into(),
        initrd: "initramfs.img".into(),
        cmdline: format!("console=ttyS0 loglevel=0 panic=-1 {cmdline_extra}")
            .trim()
            .to_string(),
    }
}

pub fn precondition_kind(st: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    st.get_error_details()
        .precondition_failure()
        .and_then(|p| p.violations.first().map(|v| v.r#type.clone()))
        .unwrap_or_default()
}

pub fn precondition_subject(st: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    st.get_error_details()
        .precondition_failure()
        .and_then(|p| p.violations.first().map(|v| v.subject.clone()))
        .unwrap_or_default()
}

/// "domain/image/volume", as the host names a volume in its errors.
pub fn volume_name(r: &common::VolumeRef) -> String {
    format!("{}/{}/{}", r.domain_id, r.image_id, r.volume_id)
}

pub fn field_of(st: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    st.get_error_details()
        .bad_request()
        .and_then(|b| b.field_violations.first().map(|f| f.field.clone()))
        .unwrap_or_default()
}

/// Runs a snapshot to its end: the progress messages, then the result or
/// the error status.
pub async fn snapshot(
    client: &mut HostServiceClient<Channel>,
    req: hpb::SnapshotVmRequest,
) -> (Vec<common::Progress>, Result<hpb::SnapshotResult, tonic::Status>) {
    let mut progress = Vec::new();
    let mut stream = match client.snapshot_vm(req).await {
        Ok(s) => s.into_inner(),
        Err(e) => return (progress, Err(e)),
    };
    loop {
        match stream.message().await {
            Ok(Some(m)) => {
                if let Some(p) = m.progress {
                    progress.push(p);
                }
                if let Some(r) = m.result {
                    return (progress, Ok(r));
                }
            }
            Ok(None) => {
                return (
                    progress,
                    Err(tonic::Status::internal("stream ended without a result")),
                )
            }
            Err(e) => return (progress, Err(e)),
        }
    }
}
