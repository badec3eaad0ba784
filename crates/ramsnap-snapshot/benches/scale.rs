//! Scale benchmark: snapshot sagas per second and their p50/p99 latency for
//! 64 concurrent VMs on simulated hosts (real `ramsnap-host` processes on
//! libvirt's test:///default driver) with the coordinator in-process on
//! PostgreSQL, and pgbench's commit rate on the same server beside it; or,
//! with SCALE_DB=sqlite, on the embedded default (SQLite, a file in a
//! temporary directory).
//!
//! `cargo bench -p ramsnap-snapshot --bench scale`
//! Env: SCALE_DB (postgres or sqlite), RAMSNAP_TEST_PG_URL (default postgres://ramsnap:ramsnap@127.0.0.1:5432/ramsnap),
//! SCALE_VMS (64), SCALE_HOSTS (4), SCALE_SNAPSHOTS (snapshots per VM, 5),
//! SCALE_SNAPSHOT (memory, or disk: disk-only snapshots of the running VMs),
//! SCALE_VM_MIB (each VM's memory, 64),
//! SCALE_REPLICAS (coordinator replicas on the one PostgreSQL database, 1:
//! in this process, each with its own gRPC server; VM i's calls go to
//! replica i mod N; a list such as 1,2,3 runs each in turn, on a fresh
//! database, and ends with one table of them all),
//! SCALE_RATE (sagas per second offered: an open loop, each request due
//! at its time and its latency counted from then; unset: a closed loop,
//! each VM's next snapshot as soon as its last ends),
//! SCALE_PGBENCH_SECS (10), RAMSNAP_HOST_BIN (path of ramsnap-host),
//! SCALE_DOMAIN_FS (fresh: the FILE domain on a new ext4 on a loop device,
//! as root; tmp: in the temporary directory; see `DomainFs`).
#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use ramsnap_common::server::ServiceSet;
use ramsnap_proto::snapshot::v1 as pb;
use ramsnap_proto::snapshot::v1::cluster_service_client::ClusterServiceClient;
use ramsnap_proto::snapshot::v1::operation_service_client::OperationServiceClient;
use ramsnap_proto::snapshot::v1::snapshot_service_client::SnapshotServiceClient;
use ramsnap_proto::snapshot::v1::vm_service_client::VmServiceClient;
use ramsnap_proto::storage::v1 as storage;
use ramsnap_proto::storage::v1::storage_service_client::StorageServiceClient;
use ramsnap_storage::service::{StorageApi, SERVICE_NAME as STORAGE_SERVICE};
use ramsnap_storage::{Config, Storage};
use sqlx::Row;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use uuid::Uuid;

const MIB: u64 = 1024 * 1024;
const DEFAULT_PG: &str = "postgres://ramsnap:ramsnap@127.0.0.1:5432/ramsnap";

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

/// The server URL with another database name.
fn with_db(url: &str, db: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("a database URL");
    let q = url
        .split_once('?')
        .map(|(_, q)| format!("?{q}"))
        .unwrap_or_default();
    format!("{base}/{db}{q}")
}

fn host_bin() -> PathBuf {
    if let Ok(p) = std::env::var("RAMSNAP_HOST_BIN") {
        return p.into();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or(root.join("target"));
    let cands: Vec<PathBuf> = ["release", "debug"]
        .iter()
        .map(|p| target.join(p).join("ramsnap-host"))
        .collect();
    // The newest build.
    cands
        .into_iter()
        .filter(|p| p.exists())
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
        .expect("ramsnap-host not built: cargo build -p ramsnap-host --bins")
}

/// Where the FILE domain lives. By default (SCALE_DOMAIN_FS=fresh, as
/// root) a new ext4 filesystem on a loop device, made for this run and
/// removed after it, as a storage domain is a filesystem (an NFS export) of
/// its own. In the temporary directory instead (SCALE_DOMAIN_FS=tmp, or
/// when not root), back-to-back runs varied from 166 to 255 sagas/s: each
/// run deletes its domain's thousands of files at the end, and ext4's inode
/// allocator then skips the recently deleted inodes one by one
/// (`recently_deleted` and `find_get_block_common`, 12 % of all CPU in a
/// `perf record` of such a run).
struct DomainFs {
    root: PathBuf,
    what: String,
    mounted: Option<(PathBuf, PathBuf)>,
}

impl DomainFs {
    fn new(dir: &Path) -> DomainFs {
        let tmp = |why: &str| DomainFs {
            root: dir.join("roots"),
            what: format!("{} ({why})", dir.display()),
            mounted: None,
        };
        let fresh = std::env::var("SCALE_DOMAIN_FS")
            .map(|v| v != "tmp")
            .unwrap_or(true);
        if !fresh {
            return tmp("SCALE_DOMAIN_FS=tmp");
        }
        if unsafe { libc::geteuid() } != 0 {
            return tmp("not root: no fresh filesystem");
        }
        let image = dir.join("domain-fs.img");
        let mnt = dir.join("domain-fs");
        std::fs::create_dir_all(&mnt).unwrap();
        let f = std::fs::File::create(&image).unwrap();
        f.set_len(4 << 30).unwrap();
        drop(f);
        let ok = |c: &mut Command| c.status().map(|s| s.success()).unwrap_or(false);
        if !ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image))
            || !ok(Command::new("mount").args(["-o", "loop"]).arg(&image).arg(&mnt))
        {
            return tmp("mkfs.ext4 or mount -o loop failed");
        }
        DomainFs {
            root: mnt.join("roots"),
            what: "a fresh 4 GiB ext4 on a loop device (SCALE_DOMAIN_FS=tmp: the temp dir)".into(),
            mounted: Some((mnt, image)),
        }
    }
}

impl Drop for DomainFs {
    fn drop(&mut self) {
        if let Some((mnt, image)) = self.mounted.take() {
            // `umount -d`: the loop device goes with it.
            let _ = Command::new("umount").arg("-d").arg(&mnt).status();
            let _ = std::fs::remove_file(image);
        }
    }
}

struct HostProc {
    child: Child,
    addr: String,
}

fn start_host(bin: &Path, dir: &Path, i: usize, storage: &str) -> HostProc {
    let d = dir.join(format!("host{i}"));
    for s in ["boot", "run", "state"] {
        std::fs::create_dir_all(d.join(s)).unwrap();
    }
    std::fs::write(d.join("boot/vmlinuz"), b"kernel").unwrap();
    std::fs::write(d.join("boot/initrd.img"), b"initrd").unwrap();
    let mut child = Command::new(bin)
        .args([
            // The coordinator and storage of this benchmark serve plain
            // gRPC on loopback.
            "--insecure",
            "--listen",
            "127.0.0.1:0",
            "--libvirt-uri",
            "test:///default",
            "--storage",
            storage,
        ])
        .arg("--boot-dir")
        .arg(d.join("boot"))
        .arg("--run-dir")
        .arg(d.join("run"))
        .arg("--state-dir")
        .arg(d.join("state"))
        .args([
            "--host-id",
            &format!("simhost-{i}"),
            "--domain-prefix",
            &format!("ramsnap-b{i}-"),
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(d.join("stderr.log")).unwrap()))
        .spawn()
        .expect("start ramsnap-host");
    let out = child.stdout.take().unwrap();
    let mut lines = BufReader::new(out).lines();
    let addr = loop {
        let l = lines
            .next()
            .unwrap_or_else(|| panic!("ramsnap-host {i} exited; see {}", d.join("stderr.log").display()))
            .unwrap();
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&l) {
            if v["event"] == "listening" {
                break format!("http://{}", v["addr"].as_str().unwrap());
            }
        }
    };
    // Keep draining its stdout.
    std::thread::spawn(move || for _ in lines {});
    HostProc { child, addr }
}

impl Drop for HostProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Clients {
    vms: VmServiceClient<Channel>,
    snaps: SnapshotServiceClient<Channel>,
    ops: OperationServiceClient<Channel>,
}

/// Follows an operation to its end; returns (state, error).
async fn wait_op(ops: &mut OperationServiceClient<Channel>, op: pb::Operation) -> pb::Operation {
    let mut last = op;
    if last.state != pb::OperationState::Running as i32 {
        return last;
    }
    let mut stream = ops
        .watch_operation(pb::WatchOperationRequest {
            operation_id: last.operation_id.clone(),
        })
        .await
        .expect("watch operation")
        .into_inner();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while last.state == pb::OperationState::Running as i32 {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Err(_) => panic!("operation {} did not end", last.operation_id),
            Ok(Ok(Some(m))) => last = m.operation.unwrap(),
            Ok(Ok(None)) | Ok(Err(_)) => {
                // Stream ended: ask once.
                last = ops
                    .get_operation(pb::GetOperationRequest {
                        operation_id: last.operation_id.clone(),
                    })
                    .await
                    .expect("get operation")
                    .into_inner()
                    .operation
                    .unwrap();
                if last.state == pb::OperationState::Running as i32 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
    last
}

fn op_ok(op: &pb::Operation) -> Result<(), String> {
    if op.state == pb::OperationState::Succeeded as i32 {
        Ok(())
    } else {
        Err(format!(
            "{} {}: {} {}",
            op.kind, op.operation_id, op.error_code, op.error_message
        ))
    }
}

async fn snapshot_once(c: &mut Clients, vm: &str, memory: bool) -> Result<Duration, String> {
    let t = Instant::now();
    let op = c
        .snaps
        .create_snapshot(pb::CreateSnapshotRequest {
            request_id: Uuid::new_v4().to_string(),
            vm_id: vm.into(),
            description: "bench".into(),
            save_memory: memory,
            memory_mode: pb::MemoryMode::Paused as i32,
        })
        .await
        .map_err(|s| format!("CreateSnapshot: {:?} {}", s.code(), s.message()))?
        .into_inner()
        .operation
        .ok_or("no operation")?;
    let op = wait_op(&mut c.ops, op).await;
    let d = t.elapsed();
    op_ok(&op).map(|_| d)
}

async fn snapshot_sagas(pool: &sqlx::AnyPool) -> i64 {
    sqlx::query("SELECT count(*) FROM sagas WHERE name = 'snapshot_create'")
        .fetch_one(pool)
        .await
        .unwrap()
        .get(0)
}

/// pgbench's TPC-B-like and -N rates on a scratch database.
fn pgbench_tps(url: &str, secs: u64) -> (f64, f64) {
    let pgb = Command::new("pgbench")
        .args(["-i", "-s", "1", "-q", url])
        .output()
        .expect("pgbench -i");
    assert!(
        pgb.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&pgb.stderr)
    );
    let run = |extra: &[&str]| {
        let mut a = vec!["-c", "8", "-j", "2", "-n"];
        a.extend_from_slice(extra);
        let secs = secs.to_string();
        let out = Command::new("pgbench")
            .args(&a)
            .args(["-T", &secs, url])
            .output()
            .expect("pgbench");
        let s = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "pgbench: {s}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        s.lines()
            .find(|l| l.starts_with("tps ="))
            .and_then(|l| l.split_whitespace().nth(2))
            .and_then(|v| v.parse::<f64>().ok())
            .expect("tps line")
    };
    (run(&[]), run(&["-N"]))
}

async fn pg_stats(pool: &sqlx::PgPool, db: &str) -> (i64, Vec<(String, i64, i64)>) {
    let commits: i64 = sqlx::query("SELECT xact_commit FROM pg_stat_database WHERE datname = $1")
        .bind(db)
        .fetch_one(pool)
        .await
        .unwrap()
        .get(0);
    let rows =
        sqlx::query("SELECT relname::text, n_tup_ins, n_tup_upd FROM pg_stat_user_tables ORDER BY relname")
            .fetch_all(pool)
            .await
            .unwrap();
    (
        commits,
        rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect(),
    )
}

async fn setup_vms(
    mk: &impl Fn() -> Clients,
    cluster_id: &str,
    domain: &str,
    host_ids: &[String],
    n_vms: usize,
    prefix: &str,
) -> Vec<String> {
    // 64 VMs, created and run concurrently, spread over the hosts.
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n_vms {
        let mut c = mk();
        let cluster_id = cluster_id.to_string();
        let domain = domain.to_string();
        let name = format!("{prefix}-{i}");
        let host_id = host_ids[i % host_ids.len()].clone();
        set.spawn(async move {
            let op = c
                .vms
                .create_vm(pb::CreateVmRequest {
                    request_id: Uuid::new_v4().to_string(),
                    name,
                    cluster_id,
                    memory_bytes: env_or("SCALE_VM_MIB", 64u64) * MIB,
                    vcpus: 1,
                    stateless: false,
                    disks: vec![pb::DiskSpec {
                        domain_id: domain,
                        capacity_bytes: 32 * MIB,
                    }],
                    kernel: "vmlinuz".into(),
                    initrd: "initrd.img".into(),
                    cmdline: "console=ttyS0".into(),
                })
                .await
                .expect("CreateVm")
                .into_inner()
                .operation
                .unwrap();
            let op = wait_op(&mut c.ops, op).await;
            op_ok(&op).expect("CreateVm operation");
            let vm = op.result_vm_id;
            let op = c
                .vms
                .run_vm(pb::RunVmRequest {
                    request_id: Uuid::new_v4().to_string(),
                    vm_id: vm.clone(),
                    host_id,
                    run_stateless: false,
                })
                .await
                .expect("RunVm")
                .into_inner()
                .operation
                .unwrap();
            let op = wait_op(&mut c.ops, op).await;
            op_ok(&op).expect("RunVm operation");
            // Wait for UP.
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let v = c
                    .vms
                    .get_vm(pb::GetVmRequest { vm_id: vm.clone() })
                    .await
                    .unwrap()
                    .into_inner()
                    .vm
                    .unwrap();
                if v.status == pb::VmStatus::Up as i32 {
                    break;
                }
                assert!(Instant::now() < deadline, "VM {vm} not UP: {:?}", v.status);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            vm
        });
    }
    let mut vms = Vec::new();
    while let Some(r) = set.join_next().await {
        vms.push(r.expect("VM setup"));
    }

    vms
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[i.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    // `cargo bench` passes --bench; nothing to parse.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

/// The coordinator's database in this run.
enum BenchDb {
    Postgres {
        url: String,
        name: String,
        pgbench_url: String,
    },
    Sqlite {
        url: String,
    },
}

impl BenchDb {
    fn url(&self) -> &str {
        match self {
            BenchDb::Postgres { url, .. } | BenchDb::Sqlite { url } => url,
        }
    }
}

async fn run() {
    let n_vms: usize = env_or("SCALE_VMS", 64);
    let n_hosts: usize = env_or("SCALE_HOSTS", 4);
    let k: usize = env_or("SCALE_SNAPSHOTS", 5);
    let pgbench_secs: u64 = env_or("SCALE_PGBENCH_SECS", 10);
    sqlx::any::install_default_drivers();
    if std::env::var("SCALE_DB").as_deref() == Ok("sqlite") {
        let dir = tempfile::tempdir().unwrap();
        let db = BenchDb::Sqlite {
            url: format!("sqlite://{}", dir.path().join("ramsnap.db").display()),
        };
        body(&db, n_vms, n_hosts, k, pgbench_secs, 1).await;
        return;
    }
    let counts: Vec<usize> = std::env::var("SCALE_REPLICAS")
        .unwrap_or_else(|_| "1".into())
        .split(',')
        .map(|n| {
            n.trim()
                .parse::<usize>()
                .expect("SCALE_REPLICAS: numbers, e.g. 1,2,3")
                .max(1)
        })
        .collect();
    let mut table = Vec::new();
    for n in counts {
        table.push(on_postgres(n_vms, n_hosts, k, pgbench_secs, n).await);
    }
    if table.len() > 1 {
        println!();
        println!("=== replicas on one PostgreSQL, this run ({n_vms} VMs, {k} snapshots each) ===");
        println!("replicas   sagas/s   vs 1 replica   p50 ms   p99 ms   failures");
        let base = table[0].sagas_per_s;
        for r in &table {
            println!(
                "{:>8}   {:>7.1}   {:>12.2}   {:>6.1}   {:>6.1}   {:>8}",
                r.replicas,
                r.sagas_per_s,
                r.sagas_per_s / base,
                ms(r.p50),
                ms(r.p99),
                r.failures
            );
        }
    }
}

/// One run's figures.
struct Summary {
    replicas: usize,
    sagas_per_s: f64,
    p50: Duration,
    p99: Duration,
    failures: usize,
}

/// [`body`] on a fresh PostgreSQL database (and one for pgbench), dropped after.
async fn on_postgres(
    n_vms: usize,
    n_hosts: usize,
    k: usize,
    pgbench_secs: u64,
    n_replicas: usize,
) -> Summary {
    let pg = std::env::var("RAMSNAP_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_PG.into());
    let tag = Uuid::new_v4().simple().to_string()[..8].to_string();
    let bench_db = format!("ramsnap_scale_{tag}");
    let pgb_db = format!("ramsnap_pgbench_{tag}");

    let admin = sqlx::PgPool::connect(&pg)
        .await
        .expect("connect to PostgreSQL (bash scripts/setup/postgres.sh)");
    for db in [&bench_db, &pgb_db] {
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
            .execute(&admin)
            .await
            .unwrap();
    }
    let bench_url = with_db(&pg, &bench_db);
    let pgb_url = with_db(&pg, &pgb_db);

    let db = BenchDb::Postgres {
        url: bench_url,
        name: bench_db.clone(),
        pgbench_url: pgb_url,
    };
    let result = std::panic::AssertUnwindSafe(body(&db, n_vms, n_hosts, k, pgbench_secs, n_replicas));
    let r = futures::FutureExt::catch_unwind(result).await;

    for db in [&bench_db, &pgb_db] {
        if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
        )))
        .execute(&admin)
        .await
        {
            eprintln!("drop {db}: {e}");
        }
    }
    admin.close().await;
    println!("cleanup: databases {bench_db}, {pgb_db} dropped");
    match r {
        Ok(summary) => summary,
        Err(p) => std::panic::resume_unwind(p),
    }
}

async fn body(
    db: &BenchDb,
    n_vms: usize,
    n_hosts: usize,
    k: usize,
    pgbench_secs: u64,
    n_replicas: usize,
) -> Summary {
    let bench_url = db.url();
    let dir = tempfile::tempdir().unwrap();
    // Storage, in-process; its FILE domain on a filesystem of its own.
    let domain_fs = DomainFs::new(dir.path());
    println!("FILE domain on              {}", domain_fs.what);
    let roots = domain_fs.root.clone();
    std::fs::create_dir_all(roots.join("nfs1")).unwrap();
    let storage_impl = Storage::open(Config {
        state_dir: dir.path().join("storage-state"),
        run_dir: dir.path().join("storage-run"),
        file_roots: vec![roots.clone()],
        block_devices: vec![dir.path().join("no-such-device")],
    })
    .await
    .unwrap();
    let (storage_addr, storage_stop) = support::serve(ServiceSet::new(
        STORAGE_SERVICE,
        StorageApi::new(storage_impl).into_server(),
    ))
    .await;
    let mut storage_client = StorageServiceClient::connect(storage_addr.clone()).await.unwrap();
    let domain = storage_client
        .register_domain(storage::RegisterDomainRequest {
            domain_id: String::new(),
            name: "nfs1".into(),
            r#type: storage::DomainType::File as i32,
            location: roots.join("nfs1").display().to_string(),
            role: storage::DomainRole::Data as i32,
            format: storage::DomainFormat::Unspecified as i32,
        })
        .await
        .unwrap()
        .into_inner()
        .domain
        .unwrap()
        .domain_id;

    // Hosts: real ramsnap-host processes on test:///default.
    let bin = host_bin();
    let mut hosts: Vec<HostProc> = (0..n_hosts)
        .map(|i| start_host(&bin, dir.path(), i, &storage_addr))
        .collect();

    // Coordinator in-process on the fresh database.
    let coord = ramsnap_snapshot::Coordinator::open(bench_url)
        .await
        .expect("coordinator");
    let (coord_addr, coord_stop) = support::serve(coord.service_set()).await;
    // More replicas on the same database (PostgreSQL only: SQLite serves one).
    let n_replicas = match db {
        BenchDb::Postgres { .. } => n_replicas,
        BenchDb::Sqlite { .. } => 1,
    };
    let mut replicas = Vec::new();
    for _ in 1..n_replicas {
        let c = ramsnap_snapshot::Coordinator::open(bench_url)
            .await
            .expect("coordinator replica");
        let (addr, stop) = support::serve(c.service_set()).await;
        let channel = tonic::transport::Endpoint::from_shared(addr)
            .unwrap()
            .connect()
            .await
            .unwrap();
        replicas.push((c, stop, channel));
    }
    let channel = tonic::transport::Endpoint::from_shared(coord_addr.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut clusters = ClusterServiceClient::new(channel.clone());
    let mk = || Clients {
        vms: VmServiceClient::new(channel.clone()),
        snaps: SnapshotServiceClient::new(channel.clone()),
        ops: OperationServiceClient::new(channel.clone()),
    };
    let cluster_id = clusters
        .create_cluster(pb::CreateClusterRequest {
            request_id: String::new(),
            name: "scale".into(),
            compatibility_version: "3.3".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .cluster
        .unwrap()
        .cluster_id;
    let mut host_ids = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        let id = clusters
            .add_host(pb::AddHostRequest {
                request_id: String::new(),
                name: format!("sim-host-{i}"),
                cluster_id: cluster_id.clone(),
                host_address: h.addr.clone(),
                storage_address: storage_addr.clone(),
            })
            .await
            .unwrap_or_else(|s| panic!("AddHost {}: {s:?}", h.addr))
            .into_inner()
            .host
            .unwrap()
            .host_id;
        host_ids.push(id);
    }

    let t_setup = Instant::now();
    let vms = setup_vms(&mk, &cluster_id, &domain, &host_ids, n_vms, "vm").await;
    println!(
        "setup: {} hosts (ramsnap-host {} on test:///default), {} VMs created and UP in {:.2}s",
        n_hosts,
        bin.display(),
        vms.len(),
        t_setup.elapsed().as_secs_f64()
    );

    // Which snapshot kind the simulated host can take.
    let mut c = mk();
    let mode = match snapshot_once(&mut c, &vms[0], true).await {
        Ok(_) => "memory snapshots (save_memory=true)",
        Err(e) => {
            println!("probe: memory snapshot on test:///default failed: {e}");
            match snapshot_once(&mut c, &vms[0], false).await {
                Ok(_) => "DISK-ONLY snapshots of running VMs (save_memory=false): test:///default cannot dump memory",
                Err(e) => {
                    println!("probe: disk-only snapshot on test:///default failed too: {e}");
                    "FALLBACK"
                }
            }
        }
    };
    // Fallback: the in-test SimulatedHost (tests/support) for the snapshot step.
    let mut sims = Vec::new();
    let (vms, mode) = if mode == "FALLBACK" {
        let mut sim_ids = Vec::new();
        for i in 0..n_hosts {
            let host = support::SimulatedHost::new();
            *host.inner.storage.lock().unwrap() = Some(storage_client.clone());
            let (addr, stop) = support::serve(ServiceSet::new(
                support::HOST_SERVICE,
                ramsnap_proto::host::v1::host_service_server::HostServiceServer::new(host.clone()),
            ))
            .await;
            let id = clusters
                .add_host(pb::AddHostRequest {
                    request_id: String::new(),
                    name: format!("in-test-sim-host-{i}"),
                    cluster_id: cluster_id.clone(),
                    host_address: addr,
                    storage_address: storage_addr.clone(),
                })
                .await
                .expect("AddHost (SimulatedHost)")
                .into_inner()
                .host
                .unwrap()
                .host_id;
            sim_ids.push(id);
            sims.push((host, stop));
        }
        let t_setup = Instant::now();
        let vms = setup_vms(&mk, &cluster_id, &domain, &sim_ids, n_vms, "simvm").await;
        println!("FALLBACK: test:///default cannot take the snapshots ramsnap-host asks for; the snapshot step runs on {} in-test SimulatedHost HostServices (tests/support/mod.rs), same coordinator/PostgreSQL/StorageService; {} new VMs UP in {:.2}s", n_hosts, vms.len(), t_setup.elapsed().as_secs_f64());
        let mut c = mk();
        let m = match snapshot_once(&mut c, &vms[0], true).await {
            Ok(_) => "FALLBACK in-test SimulatedHost: memory snapshots (save_memory=true, no real dump)",
            Err(e) => {
                println!("probe: memory snapshot on SimulatedHost failed: {e}");
                snapshot_once(&mut c, &vms[0], false)
                    .await
                    .expect("disk-only snapshot on SimulatedHost");
                "FALLBACK in-test SimulatedHost: disk-only snapshots (save_memory=false)"
            }
        };
        (vms, m)
    } else {
        (vms, mode)
    };
    // SCALE_SNAPSHOT=disk: disk-only snapshots of the running VMs (the host
    // step switches the disks and answers at once): the coordinator's own
    // cost, with nothing dumped or hashed.
    let memory =
        mode.contains("memory snapshots") && std::env::var("SCALE_SNAPSHOT").as_deref() != Ok("disk");
    let mode = if memory {
        mode
    } else {
        "disk-only snapshots of running VMs (save_memory=false)"
    };
    println!("mode: {mode}");

    // Let idle backends flush their statistics (PostgreSQL 15: 10 s idle).
    let any_pool = sqlx::AnyPool::connect(bench_url).await.unwrap();
    let pg = match db {
        BenchDb::Postgres { url, name, .. } => {
            let pool = sqlx::PgPool::connect(url).await.unwrap();
            tokio::time::sleep(Duration::from_secs(11)).await;
            let stats = pg_stats(&pool, name).await;
            Some((pool, stats))
        }
        BenchDb::Sqlite { .. } => None,
    };
    let sagas0 = snapshot_sagas(&any_pool).await;

    // The measurement. Closed loop (the default): every VM takes k
    // snapshots one after another, all VMs at once, so the coordinator is
    // saturated and the latency is mostly the queue (Little's law: about
    // VMs / sagas/s). Open loop (SCALE_RATE=R sagas/s offered): VM i's j-th
    // snapshot is due at (j * VMs + i) / R seconds, requests spread evenly
    // over the VMs, and its latency counts from when it was due, so a
    // request that starts late because its VM's previous one ran long
    // counts its wait too (no coordinated omission).
    let rate: Option<f64> = std::env::var("SCALE_RATE")
        .ok()
        .filter(|r| !r.is_empty())
        .map(|r| {
            r.parse::<f64>()
                .ok()
                .filter(|r| *r > 0.0)
                .expect("SCALE_RATE: sagas per second offered, e.g. 200")
        });
    let n_vms_run = vms.len();
    let t = Instant::now();
    let t0 = tokio::time::Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for (i, vm) in vms.clone().into_iter().enumerate() {
        let mut c = match i % n_replicas {
            0 => mk(),
            r => {
                let channel = &replicas[r - 1].2;
                Clients {
                    vms: VmServiceClient::new(channel.clone()),
                    snaps: SnapshotServiceClient::new(channel.clone()),
                    ops: OperationServiceClient::new(channel.clone()),
                }
            }
        };
        set.spawn(async move {
            let mut lat = Vec::new();
            let mut errs = Vec::new();
            for j in 0..k {
                let due = rate.map(|r| t0 + Duration::from_secs_f64((j * n_vms_run + i) as f64 / r));
                if let Some(due) = due {
                    tokio::time::sleep_until(due).await;
                }
                let late = due.map(|d| d.elapsed()).unwrap_or_default();
                match snapshot_once(&mut c, &vm, memory).await {
                    Ok(d) => lat.push(d + late),
                    Err(e) => errs.push(e),
                }
            }
            (lat, errs)
        });
    }
    let mut lat = Vec::new();
    let mut errs = Vec::new();
    while let Some(r) = set.join_next().await {
        let (l, e) = r.unwrap();
        lat.extend(l);
        errs.extend(e);
    }
    let wall = t.elapsed();
    lat.sort();
    let total = lat.len() + errs.len();
    let sagas_per_s = lat.len() as f64 / wall.as_secs_f64();

    // pgbench beside it, same server, own scratch database (also lets the
    // coordinator's idle backends flush their statistics meanwhile).
    let pgbench = match db {
        BenchDb::Postgres { pgbench_url, .. } => Some(pgbench_tps(pgbench_url, pgbench_secs)),
        BenchDb::Sqlite { .. } => None,
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let sagas1 = snapshot_sagas(&any_pool).await;
    let ev_per_saga: f64 = sqlx::query(
        "SELECT CAST(count(*) AS DOUBLE PRECISION) / NULLIF((SELECT count(*) FROM sagas WHERE name = 'snapshot_create'), 0) \
         FROM saga_node_events e JOIN sagas s ON e.saga_id = s.id WHERE s.name = 'snapshot_create'",
    )
    .fetch_one(&any_pool)
    .await
    .unwrap()
    .get::<Option<f64>, _>(0)
    .unwrap_or(0.0);
    let n_sagas = (sagas1 - sagas0).max(1) as f64;

    println!();
    match db {
        BenchDb::Postgres { .. } => println!("=== ramsnap scale: snapshot sagas on PostgreSQL ==="),
        BenchDb::Sqlite { .. } => {
            println!("=== ramsnap scale: snapshot sagas on SQLite (the embedded default) ===")
        }
    }
    println!(
        "hosts                     {n_hosts} x ramsnap-host, libvirt test:///default (simulated){}",
        if sims.is_empty() {
            String::new()
        } else {
            format!(" + {n_hosts} in-test SimulatedHost (snapshot step)")
        }
    );
    println!("coordinator replicas      {n_replicas} (in this process, one database)");
    println!("VMs (concurrent)          {}", vms.len());
    println!("snapshot kind             {mode}");
    println!("snapshots per VM          {k}");
    match rate {
        Some(r) => println!(
            "load                      open loop: {r:.1} sagas/s offered, latency from each request's due time"
        ),
        None => println!(
            "load                      closed loop: each VM's next snapshot when its last ends (SCALE_RATE=R for an open loop)"
        ),
    }
    println!("sagas (total)             {total}");
    println!("failures                  {}", errs.len());
    println!("wall time                 {:.3} s", wall.as_secs_f64());
    println!("sagas/s                   {sagas_per_s:.1}");
    println!("latency p50               {:.1} ms", ms(pct(&lat, 50.0)));
    println!("latency p99               {:.1} ms", ms(pct(&lat, 99.0)));
    println!(
        "latency max               {:.1} ms",
        ms(lat.last().copied().unwrap_or_default())
    );
    if let Some((tps_tpcb, tps_n)) = pgbench {
        println!("pgbench tps (TPC-B-like)  {tps_tpcb:.1}   (-c 8 -j 2 -T {pgbench_secs}, scale 1)");
        println!("pgbench tps (-N)          {tps_n:.1}");
        println!(
            "sagas/s / pgbench tps     {:.4} (TPC-B-like), {:.4} (-N)",
            sagas_per_s / tps_tpcb,
            sagas_per_s / tps_n
        );
    }
    println!("--- DB work per snapshot saga (from the database) ---");
    println!("snapshot_create sagas     {} in window", sagas1 - sagas0);
    println!("saga_node_events / saga   {ev_per_saga:.1}");
    if let (Some((pool, (c0, t0))), BenchDb::Postgres { name, .. }, Some((tps_tpcb, _))) = (&pg, db, pgbench)
    {
        let (c1, t1) = pg_stats(pool, name).await;
        let commits_per_saga = (c1 - c0) as f64 / n_sagas;
        println!("xact_commit / saga        {commits_per_saga:.1}   (pg_stat_database delta over the window incl. reads)");
        for ((name, i0, u0), (_, i1, u1)) in t0.iter().zip(t1.iter()) {
            let (di, du) = ((i1 - i0) as f64 / n_sagas, (u1 - u0) as f64 / n_sagas);
            if di > 0.0 || du > 0.0 {
                println!("  {name:<22}  inserts/saga {di:>5.2}  updates/saga {du:>5.2}");
            }
        }
        println!(
            "implied commits/s        {:.0} (sagas/s x xact_commit/saga), vs pgbench {:.0}",
            sagas_per_s * commits_per_saga,
            tps_tpcb
        );
    }
    // Where a saga's time goes: each node from its start to its success.
    let names: Vec<&str> = ramsnap_snapshot::sagas::snapshot_create::definition()
        .nodes
        .iter()
        .map(|n| n.name)
        .collect();
    let rows = sqlx::query(
        "SELECT a.node_id, b.created_at - a.created_at \
         FROM saga_node_events a \
         JOIN saga_node_events b ON b.saga_id = a.saga_id AND b.node_id = a.node_id \
         JOIN sagas s ON s.id = a.saga_id \
         WHERE s.name = 'snapshot_create' AND a.event_type = 'started' AND b.event_type = 'succeeded'",
    )
    .fetch_all(&any_pool)
    .await
    .unwrap();
    let mut per_node: std::collections::BTreeMap<i64, Vec<Duration>> = Default::default();
    for r in rows {
        let ms: i64 = r.get(1);
        per_node
            .entry(r.get(0))
            .or_default()
            .push(Duration::from_millis(ms.max(0) as u64));
    }
    println!("--- per node, start to success (ms) ---");
    for (node, mut times) in per_node {
        times.sort();
        let name = names.get(node as usize).copied().unwrap_or("?");
        println!(
            "  {name:<18} p50 {:>7.1}   p99 {:>7.1}",
            ms(pct(&times, 50.0)),
            ms(pct(&times, 99.0))
        );
    }
    for e in errs.iter().take(5) {
        println!("failure: {e}");
    }

    // Cleanup.
    any_pool.close().await;
    if let Some((pool, _)) = pg {
        pool.close().await;
    }
    for (c, stop, _) in replicas {
        let _ = stop.send(());
        c.close().await;
    }
    let _ = coord_stop.send(());
    coord.close().await;
    for h in hosts.iter_mut() {
        let _ = h.child.kill();
        let _ = h.child.wait();
    }
    drop(sims);
    let _ = storage_stop.send(());
    drop(domain_fs);
    drop(dir);
    println!("cleanup: {} host processes stopped, temp dir removed", n_hosts);
    assert!(errs.is_empty(), "{} snapshot sagas failed", errs.len());
    Summary {
        replicas: n_replicas,
        sagas_per_s,
        p50: pct(&lat, 50.0),
        p99: pct(&lat, 99.0),
        failures: errs.len(),
    }
}
