//! Coordinator replicas as REAL processes (`target/debug/ramsnap-snapshot`)
//! on one PostgreSQL database, with the real StorageService (a FILE domain)
//! and the simulated HostService in the test process (`support/`): the
//! agents outlive every replica, as real ones would.
//!
//! - [`replicas_killed_at_random_lose_no_saga`]: three replicas, 32 VMs with
//!   snapshot operations running on all of them, while one replica after
//!   another is killed (SIGKILL) at random moments and a new one started.
//!   Every operation must end SUCCEEDED (a crash is not a failure); the
//!   sagas of each killed replica must be owned by a live replica within
//!   lease + 5 s; at the end no saga is unfinished, no VM locked, no volume
//!   orphaned, and the host took exactly one snapshot per snapshot
//!   operation of a running VM (none applied twice).
//! - [`a_frozen_replica_is_fenced_and_gives_its_sagas_up`]: a replica
//!   frozen (SIGSTOP) inside a saga, past its lease; another adopts and
//!   ends the saga; thawed, the frozen one's writes are refused (by the
//!   database and by the agents) and it gives the saga up, then serves on.
//!
//! Client calls go to any live replica and are retried on another one,
//! with the same request id, when theirs dies: request-id idempotency
//! across replicas is part of what is tested.
mod support;

use ramsnap_proto::snapshot::v1 as pb;
use ramsnap_proto::snapshot::v1::operation_service_client::OperationServiceClient;
use ramsnap_proto::snapshot::v1::snapshot_service_client::SnapshotServiceClient;
use ramsnap_proto::snapshot::v1::vm_service_client::VmServiceClient;
use ramsnap_snapshot::db::Database;
use sqlx::Row;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::process::{tail, Backend, CoordinatorProcess};
use support::{Agents, Env, HostCall};
use tonic::transport::Channel;
use tonic::{Code, Status};
use uuid::Uuid;

/// Each replica's lease: short, so that the test runs in seconds.
const LEASE: Duration = Duration::from_millis(2000);

/// A small PRNG (xorshift64*), seeded from the clock unless
/// `RAMSNAP_TEST_SEED` is set; the seed is printed to replay a run.
struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let seed = std::env::var("RAMSNAP_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("RAMSNAP_TEST_SEED={seed}");
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from + 1))
    }
}

// ---------------------------------------------------------------------------
// The replicas.

/// The replicas running now, by slot; their addresses for the clients.
struct Replicas {
    db_url: String,
    dir: PathBuf,
    slots: Vec<Option<CoordinatorProcess>>,
    /// Each slot's probe address (`/readyz`, `/livez`).
    probes: Vec<Option<std::net::SocketAddr>>,
    live: Live,
    starts: usize,
}

/// The addresses of the live replicas, shared with the clients.
#[derive(Clone, Default)]
struct Live(Arc<Mutex<Vec<String>>>);

impl Live {
    fn pick(&self, n: u64) -> Option<String> {
        let live = self.0.lock().unwrap();
        (!live.is_empty()).then(|| live[(n % live.len() as u64) as usize].clone())
    }
}

impl Replicas {
    async fn start(db_url: &str, dir: PathBuf, n: usize) -> Replicas {
        let mut r = Replicas {
            db_url: db_url.to_string(),
            dir,
            slots: (0..n).map(|_| None).collect(),
            probes: vec![None; n],
            live: Live::default(),
            starts: 0,
        };
        for slot in 0..n {
            r.start_in(slot, None).await;
        }
        r
    }

    async fn start_in(&mut self, slot: usize, failpoints: Option<&str>) {
        let log = self.dir.join(format!("replica-{}.log", self.starts));
        self.starts += 1;
        // A free port for the probes (taken back at once; the process
        // binds it a moment later).
        let probe = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        self.probes[slot] = Some(probe);
        let env = [
            ("RAMSNAP_LEASE_MS", LEASE.as_millis().to_string()),
            ("RAMSNAP_FAILPOINT_DIR", self.dir.display().to_string()),
            ("RAMSNAP_PROBE_LISTEN", probe.to_string()),
        ];
        let p = CoordinatorProcess::start_with(&self.db_url, failpoints, log, &env).await;
        self.live.0.lock().unwrap().push(p.addr.clone());
        self.slots[slot] = Some(p);
    }

    /// SIGKILLs the replica in `slot`; its PID.
    async fn kill(&mut self, slot: usize) -> i32 {
        let p = self.slots[slot].take().expect("a replica in the slot");
        let pid = p.pid();
        self.live.0.lock().unwrap().retain(|a| *a != p.addr);
        p.kill().await;
        pid
    }

    fn get(&self, slot: usize) -> &CoordinatorProcess {
        self.slots[slot].as_ref().expect("a replica in the slot")
    }
}

/// `GET /readyz` of a replica's probe port: (status code, body).
async fn readyz(addr: std::net::SocketAddr) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /readyz HTTP/1.1\r\nhost: probe\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let code = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string())
}

/// The replica id a coordinator process registered under.
async fn replica_id(db: &Database, pid: i32) -> Uuid {
    for _ in 0..100 {
        let row = sqlx::query("SELECT id FROM coordinators WHERE pid = $1 ORDER BY started_at DESC LIMIT 1")
            .bind(i64::from(pid))
            .fetch_optional(db.pool())
            .await
            .unwrap();
        if let Some(row) = row {
            return row.get::<String, _>("id").parse().unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no replica registered with PID {pid}");
}

async fn count(db: &Database, sql: &'static str) -> i64 {
    sqlx::query(sql)
        .fetch_one(db.pool())
        .await
        .unwrap()
        .get::<i64, _>(0)
}

async fn unfinished_owned_by(db: &Database, replica: Uuid) -> i64 {
    sqlx::query("SELECT COUNT(*) FROM sagas WHERE owner = $1 AND state IN ('RUNNING', 'UNWINDING')")
        .bind(replica.to_string())
        .fetch_one(db.pool())
        .await
        .unwrap()
        .get::<i64, _>(0)
}

// ---------------------------------------------------------------------------
// Clients that follow the live replicas.

fn channel(addr: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(addr.to_string())
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy()
}

/// What a client retries elsewhere: the replica it called is gone (or
/// going), not the request refused.
fn replica_gone(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
    )
}

/// Calls `call` on a live replica, again on another (same request) while
/// the one called dies under it.
async fn on_any<T, F, Fut>(live: &Live, rng: &Mutex<Rng>, what: &str, mut call: F) -> T
where
    F: FnMut(Channel) -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let n = rng.lock().unwrap().next();
        if let Some(addr) = live.pick(n) {
            match tokio::time::timeout(Duration::from_secs(10), call(channel(&addr))).await {
                Ok(Ok(v)) => return v,
                Ok(Err(s)) if replica_gone(&s) => {}
                Ok(Err(s)) => panic!("{what} on {addr}: {s:?}"),
                Err(_) => {}
            }
        }
        assert!(Instant::now() < deadline, "{what}: no replica answered for 120 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Follows an operation to its end, polling any live replica.
async fn ended(live: &Live, rng: &Mutex<Rng>, op: pb::Operation) -> pb::Operation {
    let deadline = Instant::now() + Duration::from_secs(120);
    let id = op.operation_id.clone();
    loop {
        let op = on_any(live, rng, "GetOperation", |c| {
            let id = id.clone();
            async move {
                OperationServiceClient::new(c)
                    .get_operation(pb::GetOperationRequest { operation_id: id })
                    .await
                    .map(|r| r.into_inner().operation.expect("an operation"))
            }
        })
        .await;
        if op.state != pb::OperationState::Running as i32 {
            return op;
        }
        assert!(
            Instant::now() < deadline,
            "operation did not end in 120 s: {op:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One VM's worker: snapshots (with memory when the VM runs), each removed
/// again when the VM is down, until `stop`; the operations it saw end.
async fn worker(
    live: Live,
    rng: Arc<Mutex<Rng>>,
    vm_id: String,
    running: bool,
    stop: Arc<AtomicBool>,
) -> Vec<(String, pb::Operation)> {
    let mut seen = Vec::new();
    let mut round = 0;
    while round < 2 || !stop.load(Ordering::SeqCst) {
        round += 1;
        let req = Env::snapshot_req(&vm_id, running, &format!("round {round}"));
        let op = on_any(&live, &rng, "CreateSnapshot", |c| {
            let req = req.clone();
            async move {
                SnapshotServiceClient::new(c)
                    .create_snapshot(req)
                    .await
                    .map(|r| r.into_inner().operation.expect("an operation"))
            }
        })
        .await;
        let op = ended(&live, &rng, op).await;
        let snapshot_id = op.snapshot_id.clone();
        let succeeded = op.state == pb::OperationState::Succeeded as i32;
        seen.push(("create_snapshot".to_string(), op));
        if running || !succeeded {
            continue;
        }
        let req = pb::RemoveSnapshotRequest {
            request_id: Uuid::new_v4().to_string(),
            vm_id: vm_id.clone(),
            snapshot_id,
        };
        let op = on_any(&live, &rng, "RemoveSnapshot", |c| {
            let req = req.clone();
            async move {
                SnapshotServiceClient::new(c)
                    .remove_snapshot(req)
                    .await
                    .map(|r| r.into_inner().operation.expect("an operation"))
            }
        })
        .await;
        seen.push(("remove_snapshot".to_string(), ended(&live, &rng, op).await));
    }
    seen
}

// ---------------------------------------------------------------------------
// The tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_killed_at_random_lose_no_saga() {
    const VMS: usize = 32;
    let kill_phase = Duration::from_secs(
        std::env::var("RAMSNAP_REPLICA_KILL_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(30),
    );
    let backend = Backend::postgres();
    let agents = Agents::start().await;
    let dir = agents.dir.path().to_path_buf();
    let db_url = backend.fresh_database(&dir).await;
    let mut replicas = Replicas::start(&db_url, dir.clone(), 3).await;
    let db = Database::connect(&db_url).await.unwrap();
    let mut env = Env::new(agents, &replicas.get(0).addr, "3.3").await;
    let rng = Arc::new(Mutex::new(Rng::seeded()));

    // 32 VMs with one disk each, half of them running.
    let mut vms = Vec::new();
    for i in 0..VMS {
        let vm = env.create_vm_with(&format!("vm-{i}"), 1, false).await;
        let running = i % 2 == 0;
        if running {
            run_until_up(&mut env, &vm).await;
        }
        vms.push((vm, running));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = vms
        .iter()
        .map(|(vm, running)| {
            tokio::spawn(worker(
                replicas.live.clone(),
                rng.clone(),
                vm.clone(),
                *running,
                stop.clone(),
            ))
        })
        .collect();

    // Kill a replica at a random moment, start its successor a random part
    // of a lease later (before it, the others adopt at the lease's end; a
    // successor on this host ends a dead predecessor's lease at once).
    let started = Instant::now();
    let mut adoptions = Vec::new();
    let mut kills = 0;
    while started.elapsed() < kill_phase {
        let wait = rng.lock().unwrap().millis(300, 2500);
        tokio::time::sleep(wait).await;
        let slot = rng.lock().unwrap().below(3) as usize;
        let id = replica_id(&db, replicas.get(slot).pid()).await;
        let owned_at_kill = unfinished_owned_by(&db, id).await;
        let killed_at = Instant::now();
        replicas.kill(slot).await;
        kills += 1;
        let db2 = db.clone();
        adoptions.push(tokio::spawn(async move {
            loop {
                if unfinished_owned_by(&db2, id).await == 0 {
                    return (owned_at_kill, killed_at.elapsed());
                }
                if killed_at.elapsed() > LEASE + Duration::from_secs(5) {
                    return (owned_at_kill, killed_at.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
        let successor_after = rng.lock().unwrap().millis(0, LEASE.as_millis() as u64 + 500);
        tokio::time::sleep(successor_after).await;
        replicas.start_in(slot, None).await;
    }
    stop.store(true, Ordering::SeqCst);

    let mut ops = Vec::new();
    for w in workers {
        ops.extend(w.await.expect("a worker panicked"));
    }
    let mut worst = Duration::ZERO;
    let mut adopted = 0;
    for a in adoptions {
        let (owned, took) = a.await.unwrap();
        assert!(
            took <= LEASE + Duration::from_secs(5),
            "the {owned} unfinished sagas of a killed replica were not all adopted within lease + 5 s"
        );
        adopted += owned;
        worst = worst.max(took);
    }
    eprintln!(
        "{kills} kills in {:.1} s; {} operations; {adopted} sagas were unfinished on a killed replica; \
         longest time until a killed replica owned none: {} ms (lease {} ms)",
        started.elapsed().as_secs_f64(),
        ops.len(),
        worst.as_millis(),
        LEASE.as_millis()
    );
    assert!(kills >= 3, "too few kills to mean anything: {kills}");

    // Every operation succeeded: a replica's death is not a failure.
    let failed: Vec<&(String, pb::Operation)> = ops
        .iter()
        .filter(|(_, op)| op.state != pb::OperationState::Succeeded as i32)
        .collect();
    assert!(failed.is_empty(), "operations that did not succeed: {failed:#?}");

    // Nothing left unfinished or locked.
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM sagas WHERE state IN ('RUNNING', 'UNWINDING')"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM vms WHERE lock_operation_id IS NOT NULL"
        )
        .await,
        0
    );
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM sagas WHERE parked IS NOT NULL").await,
        0
    );

    // No step applied twice: one host snapshot per snapshot of a running
    // VM (a replayed call joins the job), and the snapshots recorded are
    // exactly those made and not removed.
    let running_creates = ops
        .iter()
        .filter(|(kind, op)| {
            kind == "create_snapshot" && vms.iter().any(|(vm, running)| *running && *vm == op.vm_id)
        })
        .count();
    let host_snapshots: HashMap<String, usize> =
        env.host.calls().into_iter().fold(HashMap::new(), |mut m, c| {
            if let HostCall::Snapshot { job_id, .. } = c {
                *m.entry(job_id).or_default() += 1;
            }
            m
        });
    assert!(host_snapshots.values().all(|n| *n == 1), "{host_snapshots:?}");
    assert_eq!(host_snapshots.len(), running_creates);
    env.reconnect(&replicas.get(0).addr).await;
    for (vm, running) in &vms {
        let regular = env
            .snapshots(vm)
            .await
            .into_iter()
            .filter(|s| s.r#type == pb::SnapshotType::Regular as i32)
            .count();
        let made = ops
            .iter()
            .filter(|(kind, op)| kind == "create_snapshot" && op.vm_id == *vm)
            .count();
        let expected = if *running { made } else { 0 };
        assert_eq!(regular, expected, "snapshots of {vm}");
    }
    env.assert_no_orphans().await;

    for slot in 0..3 {
        replicas.kill(slot).await;
    }
    db.close().await;
    backend.drop_databases().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_replica_is_fenced_and_gives_its_sagas_up() {
    let backend = Backend::postgres();
    let agents = Agents::start().await;
    let dir = agents.dir.path().to_path_buf();
    let db_url = backend.fresh_database(&dir).await;
    let mut replicas = Replicas::start(&db_url, dir.clone(), 2).await;
    let db = Database::connect(&db_url).await.unwrap();
    let mut env = Env::new(agents, &replicas.get(1).addr, "3.3").await;
    let vm = env.create_vm_with("frozen", 1, false).await;
    run_until_up(&mut env, &vm).await;
    // Replica A (slot 0) again, to hold its snapshot saga before the host
    // takes the snapshot.
    replicas.kill(0).await;
    replicas
        .start_in(0, Some("snapshot_create.host_snapshot=hold"))
        .await;
    let a = replicas.get(0);
    let a_id = replica_id(&db, a.pid()).await;
    let b_id = replica_id(&db, replicas.get(1).pid()).await;

    let mut on_a = SnapshotServiceClient::new(channel(&a.addr));
    let op = on_a
        .create_snapshot(Env::snapshot_req(&vm, true, "frozen"))
        .await
        .unwrap()
        .into_inner()
        .operation
        .unwrap();
    let held = "failpoint snapshot_create.host_snapshot=hold: waiting";
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&a.log).unwrap_or_default().contains(held) {
        assert!(Instant::now() < deadline, "A never held; log:\n{}", tail(&a.log));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let saga_row = sqlx::query("SELECT id, generation FROM sagas WHERE operation_id = $1")
        .bind(&op.operation_id)
        .fetch_one(db.pool())
        .await
        .unwrap();
    let saga_id: String = saga_row.get("id");
    let first_generation: i64 = saga_row.get("generation");

    // Ready while it holds its lease (what the Kubernetes probe asks).
    let a_probe = replicas.probes[0].unwrap();
    let (code, body) = readyz(a_probe).await;
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains(&a_id.to_string()) && body.contains("holds its lease"),
        "{body}"
    );

    // Freeze A past its lease: B adopts the saga and ends it.
    a.signal(libc::SIGSTOP);
    let frozen_at = Instant::now();
    let live = Live(Arc::new(Mutex::new(vec![replicas.get(1).addr.clone()])));
    let rng = Mutex::new(Rng::seeded());
    let op = ended(&live, &rng, op).await;
    assert_eq!(op.state, pb::OperationState::Succeeded as i32, "{op:?}");
    eprintln!(
        "adopted and ended by B {} ms after the freeze",
        frozen_at.elapsed().as_millis()
    );
    let saga = sqlx::query("SELECT owner, generation, state FROM sagas WHERE id = $1")
        .bind(&saga_id)
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(saga.get::<String, _>("owner"), b_id.to_string());
    assert!(saga.get::<i64, _>("generation") > first_generation);
    let events_before = count_events(&db, &saga_id).await;
    let host_calls_before = env.host.calls().len();

    // Thaw A, its held node released: whatever it attempts for the saga is
    // refused and it gives the saga up.
    std::fs::write(dir.join("snapshot_create.host_snapshot"), b"").unwrap();
    a.signal(libc::SIGCONT);
    let deadline = Instant::now() + Duration::from_secs(15);
    let gave_up = loop {
        let log = std::fs::read_to_string(&a.log).unwrap_or_default();
        let refused = log.contains("STALE_OWNER") || log.contains("is owned by another coordinator");
        let lease_lost = log.contains("lease ran out");
        if refused || lease_lost {
            break (refused, lease_lost);
        }
        assert!(
            Instant::now() < deadline,
            "A did not give the saga up; log:\n{}",
            tail(&a.log)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "thawed A: refused by a fence: {}, found its lease lost: {}",
        gave_up.0, gave_up.1
    );
    tokio::time::sleep(LEASE).await;
    for line in std::fs::read_to_string(&a.log).unwrap_or_default().lines() {
        if line.contains("STALE_OWNER")
            || line.contains("another coordinator")
            || line.contains("lease ran out")
        {
            eprintln!("  A: {line}");
        }
    }
    // Nothing A did after the freeze landed: no host call (a refused call
    // never reaches the host), no log event, the saga still B's and done.
    let late: Vec<HostCall> = env.host.calls()[host_calls_before..].to_vec();
    assert!(
        late.is_empty(),
        "the host was called after the adoption: {late:#?}"
    );
    assert_eq!(count_events(&db, &saga_id).await, events_before);
    let saga = sqlx::query("SELECT owner, state FROM sagas WHERE id = $1")
        .bind(&saga_id)
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(saga.get::<String, _>("owner"), b_id.to_string());
    assert_eq!(saga.get::<String, _>("state"), "DONE");
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM vms WHERE lock_operation_id IS NOT NULL"
        )
        .await,
        0
    );
    let snapshots = env.snapshots(&vm).await;
    assert_eq!(
        snapshots
            .iter()
            .filter(|s| s.r#type == pb::SnapshotType::Regular as i32)
            .count(),
        1,
        "{snapshots:#?}"
    );

    // A lives on as a member: registered again, it runs new operations.
    let a = replicas.get(0);
    let a_live = db
        .replicas()
        .await
        .unwrap()
        .iter()
        .any(|r| r.id == a_id && r.live);
    assert!(a_live, "A did not register again");
    let (code, body) = readyz(a_probe).await;
    assert_eq!(code, 200, "{body}");
    let mut vms_on_a = VmServiceClient::new(channel(&a.addr));
    let stop = vms_on_a
        .stop_vm(pb::StopVmRequest {
            request_id: Uuid::new_v4().to_string(),
            vm_id: vm.clone(),
            graceful_timeout_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .operation
        .unwrap();
    let stop = ended(&Live(Arc::new(Mutex::new(vec![a.addr.clone()]))), &rng, stop).await;
    assert_eq!(stop.state, pb::OperationState::Succeeded as i32, "{stop:?}");

    for slot in 0..2 {
        replicas.kill(slot).await;
    }
    db.close().await;
    backend.drop_databases().await;
}

/// Runs the VM and waits until the host reports it UP (the simulated
/// host answers RunVm with UP while its status stream still says
/// POWERING_UP for [`support::UP_DELAY`]).
async fn run_until_up(env: &mut Env, vm: &str) {
    env.run_op(vm, false).await;
    tokio::time::sleep(support::UP_DELAY + Duration::from_millis(200)).await;
    env.wait_status(vm, pb::VmStatus::Up).await;
}

async fn count_events(db: &Database, saga_id: &str) -> i64 {
    sqlx::query("SELECT COUNT(*) FROM saga_node_events WHERE saga_id = $1")
        .bind(saga_id)
        .fetch_one(db.pool())
        .await
        .unwrap()
        .get::<i64, _>(0)
}
