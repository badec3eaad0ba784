//! The real `ramsnapd` binary (a simulated host: libvirt's test:///default)
//! stopping and failing to start:
//! - SIGTERM ends every open server stream at once (coordinator WatchVm,
//!   host WatchVmStatus, a health Watch) and the process exits soon after;
//! - a call that never ends holds the process for `--shutdown-grace`, no
//!   more; a second signal exits at once;
//! - a start-up error (taken port, bad database URL, data directory that
//!   cannot be made) is one line on stderr and a non-zero status, without a
//!   backtrace or an `Error: ` debug dump.
use ramsnap_proto::host::v1 as hpb;
use ramsnap_proto::host::v1::host_service_client::HostServiceClient;
use ramsnap_proto::snapshot::v1 as pb;
use ramsnap_proto::snapshot::v1::cluster_service_client::ClusterServiceClient;
use ramsnap_proto::snapshot::v1::operation_service_client::OperationServiceClient;
use ramsnap_proto::snapshot::v1::vm_service_client::VmServiceClient;
use ramsnap_proto::storage::v1 as spb;
use ramsnap_proto::storage::v1::storage_service_client::StorageServiceClient;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const MIB: u64 = 1024 * 1024;
/// How long a process may take to print its "listening" lines.
const START_TIMEOUT: Duration = Duration::from_secs(60);

fn ramsnapd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ramsnapd"));
    c.env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("RAMSNAP_SHUTDOWN_GRACE")
        // Plain text on loopback: these tests are about stopping.
        .env("RAMSNAP_INSECURE", "true")
        // What made the debug dump a backtrace: it must not matter.
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null());
    // A test process that dies must not leave its daemon running.
    // SAFETY: prctl(2) is async-signal-safe; nothing else runs in the child.
    unsafe {
        use std::os::unix::process::CommandExt;
        c.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c
}

/// Arguments that keep everything of the daemon in `dir`, on free ports.
fn args(dir: &Path) -> Vec<String> {
    let p = |s: &str| dir.join(s).display().to_string();
    [
        "--libvirt-uri",
        "test:///default",
        "--snapshot-listen",
        "127.0.0.1:0",
        "--storage-listen",
        "127.0.0.1:0",
        "--host-listen",
        "127.0.0.1:0",
        "--data-dir",
        &p("data"),
        "--run-dir",
        &p("storage-run"),
        "--host-run-dir",
        &p("host-run"),
        "--block-device",
        &p("no-such-device"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A running ramsnapd; killed on drop.
struct Daemon {
    child: Option<Child>,
    addrs: HashMap<String, SocketAddr>,
    dir: TempDir,
}

impl Daemon {
    fn spawn(extra: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
        let mut child = ramsnapd()
            .args(args(dir.path()))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawning ramsnapd");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut daemon = Daemon {
            child: Some(child),
            addrs: HashMap::new(),
            dir,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while daemon.addrs.len() < 3 {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("ramsnapd did not start:\n{}", daemon.stderr()));
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if v["event"] == "listening" {
                daemon.addrs.insert(
                    v["service"].as_str().unwrap().to_string(),
                    v["addr"].as_str().unwrap().parse().unwrap(),
                );
            }
        }
        daemon
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    async fn channel(&self, service: &str) -> Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.addrs[service]))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = self.child.as_ref().unwrap().id() as libc::pid_t;
        // SAFETY: kill(2) on our child, not reaped yet.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }

    /// The exit status, if the process exits within `timeout`.
    async fn exited_within(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn wait_operation(
    ops: &mut OperationServiceClient<Channel>,
    op: Option<pb::Operation>,
) -> pb::Operation {
    let id = op.expect("an operation").operation_id;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let op = ops
            .get_operation(pb::GetOperationRequest {
                operation_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .operation
            .unwrap();
        match op.state() {
            pb::OperationState::Running | pb::OperationState::Unspecified => {}
            pb::OperationState::Succeeded => return op,
            _ => panic!("operation failed: {op:?}"),
        }
        assert!(Instant::now() < deadline, "operation still running: {op:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How a server stream ended: its status code (OK for a plain end).
async fn stream_end<T>(stream: &mut tonic::Streaming<T>, within: Duration) -> Result<Code, String> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.message()).await {
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None)) => return Ok(Code::Ok),
            Ok(Err(st)) => return Ok(st.code()),
            Err(_) => return Err(format!("still open {within:?} after SIGTERM")),
        }
    }
}

/// A VM made and run through the coordinator on the simulated host, with
/// its status followed by three open streams: the coordinator's WatchVm,
/// the host's WatchVmStatus (besides the coordinator's own follower), a
/// health Watch on the storage port. SIGTERM ends every one of them at
/// once, and the process exits 0 long before the default grace (10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_open_streams_and_exits_at_once() {
    let mut d = Daemon::spawn(&[]);
    let snapshot = d.channel("snapshot").await;
    let mut storage = StorageServiceClient::new(d.channel("storage").await);
    let mut host = HostServiceClient::new(d.channel("host").await);
    let mut vms = VmServiceClient::new(snapshot.clone());
    let mut ops = OperationServiceClient::new(snapshot.clone());
    let mut clusters = ClusterServiceClient::new(snapshot.clone());

    let location = d.dir.path().join("data/domains/files");
    std::fs::create_dir_all(&location).unwrap();
    let domain = storage
        .register_domain(spb::RegisterDomainRequest {
            name: "files".into(),
            r#type: spb::DomainType::File as i32,
            location: location.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .domain
        .unwrap()
        .domain_id;
    let cluster = clusters
        .list_clusters(pb::ListClustersRequest {})
        .await
        .unwrap()
        .into_inner()
        .clusters
        .into_iter()
        .find(|c| c.name == "default")
        .expect("the default cluster");
    let created = vms
        .create_vm(pb::CreateVmRequest {
            request_id: uuid::Uuid::new_v4().to_string(),
            name: "streams".into(),
            cluster_id: cluster.cluster_id,
            memory_bytes: 128 * MIB,
            vcpus: 1,
            disks: vec![pb::DiskSpec {
                domain_id: domain,
                capacity_bytes: 64 * MIB,
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .operation;
    let vm = wait_operation(&mut ops, created).await.result_vm_id;
    let run = vms
        .run_vm(pb::RunVmRequest {
            request_id: uuid::Uuid::new_v4().to_string(),
            vm_id: vm.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .operation;
    wait_operation(&mut ops, run).await;

    let mut watch_vm = vms
        .watch_vm(pb::WatchVmRequest { vm_id: vm.clone() })
        .await
        .unwrap()
        .into_inner();
    watch_vm
        .message()
        .await
        .unwrap()
        .expect("the VM's current status");
    let mut watch_host = host
        .watch_vm_status(hpb::WatchVmStatusRequest { vm_id: vm.clone() })
        .await
        .unwrap()
        .into_inner();
    let first = watch_host
        .message()
        .await
        .unwrap()
        .expect("the host's current status");
    assert_eq!(first.status(), hpb::VmStatus::Up);
    let mut health = HealthClient::new(d.channel("storage").await)
        .watch(HealthCheckRequest { service: "".into() })
        .await
        .unwrap()
        .into_inner();
    health.message().await.unwrap().expect("serving");

    let since = Instant::now();
    d.signal(libc::SIGTERM);
    let within = Duration::from_secs(3);
    let ends = [
        ("WatchVm", stream_end(&mut watch_vm, within).await),
        ("WatchVmStatus", stream_end(&mut watch_host, within).await),
        ("Health.Watch", stream_end(&mut health, within).await),
    ];
    for (name, end) in &ends {
        match end {
            Ok(code) => assert!(
                matches!(code, Code::Unavailable | Code::Ok),
                "{name} ended with {code:?}"
            ),
            Err(e) => panic!("{name}: {e}\n{}", d.stderr()),
        }
    }
    let status = d
        .exited_within(Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("ramsnapd still runs 5 s after SIGTERM:\n{}", d.stderr()));
    let took = since.elapsed();
    eprintln!("exited {took:?} after SIGTERM, with three streams open");
    assert!(status.success(), "{status}:\n{}", d.stderr());
    assert!(took < Duration::from_secs(4), "exited {took:?} after SIGTERM");
}

/// A TCP listener that accepts connections and never answers: a storage
/// agent that hangs. Returns its address and a receiver told of each
/// connection.
fn blackhole() -> (SocketAddr, mpsc::Receiver<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            // Wait for the request's first bytes, then hold the connection.
            let mut b = [0u8; 64];
            let _ = conn.read(&mut b);
            held.push(conn);
            let _ = tx.send(());
        }
    });
    (addr, rx)
}

/// A CreateVm stuck in the coordinator (its cluster's storage agent never
/// answers); returns once the call is in flight.
async fn stuck_call(d: &Daemon) -> tokio::task::JoinHandle<Result<(), tonic::Status>> {
    let (hole, accepted) = blackhole();
    let channel = d.channel("snapshot").await;
    let mut clusters = ClusterServiceClient::new(channel.clone());
    let cluster = clusters
        .create_cluster(pb::CreateClusterRequest {
            request_id: uuid::Uuid::new_v4().to_string(),
            name: "stuck".into(),
            compatibility_version: "3.3".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .cluster
        .unwrap();
    clusters
        .add_host(pb::AddHostRequest {
            request_id: uuid::Uuid::new_v4().to_string(),
            name: "hung".into(),
            cluster_id: cluster.cluster_id.clone(),
            host_address: format!("http://{hole}"),
            storage_address: format!("http://{hole}"),
        })
        .await
        .unwrap();
    let mut vms = VmServiceClient::new(channel);
    let call = tokio::spawn(async move {
        vms.create_vm(pb::CreateVmRequest {
            request_id: uuid::Uuid::new_v4().to_string(),
            name: "stuck".into(),
            cluster_id: cluster.cluster_id,
            memory_bytes: 128 * MIB,
            vcpus: 1,
            disks: vec![pb::DiskSpec {
                domain_id: uuid::Uuid::new_v4().to_string(),
                capacity_bytes: 64 * MIB,
            }],
            ..Default::default()
        })
        .await
        .map(|_| ())
    });
    tokio::task::spawn_blocking(move || accepted.recv_timeout(Duration::from_secs(20)))
        .await
        .unwrap()
        .expect("the coordinator called the hung storage agent");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!call.is_finished(), "the call did not hang: {:?}", call.await);
    call
}

/// A call that never ends holds the process for the grace period, then it
/// exits anyway (0: a clean stop that abandoned the call).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_call_holds_the_process_for_the_grace_only() {
    let grace = Duration::from_secs(2);
    let mut d = Daemon::spawn(&["--shutdown-grace", "2s"]);
    let call = stuck_call(&d).await;
    let since = Instant::now();
    d.signal(libc::SIGTERM);
    let status = d
        .exited_within(grace + Duration::from_secs(5))
        .await
        .unwrap_or_else(|| {
            panic!(
                "ramsnapd still runs {grace:?} + 5 s after SIGTERM:\n{}",
                d.stderr()
            )
        });
    let took = since.elapsed();
    eprintln!("exited {took:?} after SIGTERM, with a call stuck (grace {grace:?})");
    assert!(status.success(), "{status}:\n{}", d.stderr());
    assert!(took >= grace, "exited {took:?} after SIGTERM, within the grace");
    // The documented bound: the grace, then at most 2 s for the database
    // pool and 1 s for the runtime's tasks.
    assert!(
        took < grace + Duration::from_secs(4),
        "exited {took:?} after SIGTERM"
    );
    let r = tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .expect("the client learns its call is gone")
        .unwrap();
    assert!(r.is_err(), "{r:?}");
}

/// With a call stuck and a long grace, a second signal exits at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let mut d = Daemon::spawn(&["--shutdown-grace", "60s"]);
    let _call = stuck_call(&d).await;
    d.signal(libc::SIGTERM);
    assert!(
        d.exited_within(Duration::from_millis(700)).await.is_none(),
        "the stuck call did not hold the process: the test proves nothing"
    );
    let since = Instant::now();
    d.signal(libc::SIGINT);
    let status = d
        .exited_within(Duration::from_secs(3))
        .await
        .unwrap_or_else(|| panic!("ramsnapd still runs 3 s after a second signal:\n{}", d.stderr()));
    eprintln!("exited {:?} after the second signal", since.elapsed());
    assert!(since.elapsed() < Duration::from_secs(2), "{:?}", since.elapsed());
    assert_eq!(status.code(), Some(128 + libc::SIGINT), "{status}");
}

/// Runs ramsnapd to its exit (bounded) and returns (status, stdout, stderr).
fn run_to_exit(args: Vec<String>) -> (ExitStatus, String, String) {
    let mut child = ramsnapd()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ramsnapd did not exit within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, out.join().unwrap(), err.join().unwrap())
}

fn with(mut args: Vec<String>, flag: &str, value: &str) -> Vec<String> {
    let i = args.iter().position(|a| a == flag).unwrap();
    args[i + 1] = value.to_string();
    args
}

fn assert_one_line(what: &str, (status, stdout, stderr): (ExitStatus, String, String), expected: &str) {
    assert!(!status.success(), "{what}: exit {status}");
    assert_eq!(status.code(), Some(1), "{what}: {status}\n{stderr}");
    assert!(
        !stderr.contains("Stack backtrace") && !stderr.contains("Error: "),
        "{what}: a debug dump on stderr:\n{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{what}: not one line:\n{stderr}");
    assert!(
        stderr.starts_with(expected),
        "{what}: stderr {stderr:?} does not start with {expected:?}"
    );
    assert!(
        !stdout.contains("listening"),
        "{what}: announced ports it then did not serve:\n{stdout}"
    );
}

/// A taken port, a bad database URL, a data directory that cannot be made:
/// one line on stderr each, status 1, nothing announced.
#[test]
fn start_up_errors_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let base = args(dir.path());

    let addr = format!("127.0.0.1:{port}");
    assert_one_line(
        "taken port",
        run_to_exit(with(base.clone(), "--host-listen", &addr)),
        &format!("ramsnapd: cannot listen on {addr}: address already in use"),
    );
    assert_eq!(
        run_to_exit(with(base.clone(), "--host-listen", &addr))
            .2
            .trim_end(),
        format!("ramsnapd: cannot listen on {addr}: address already in use")
    );

    let mut bad_db = base.clone();
    bad_db.extend([
        "--database-url".into(),
        "mysql://ramsnap:secret@db/ramsnap".into(),
    ]);
    let r = run_to_exit(bad_db);
    assert!(!r.2.contains("secret"), "the password is shown: {}", r.2);
    assert_one_line(
        "bad database URL",
        r,
        "ramsnapd: cannot open the database mysql://ramsnap:***@db/ramsnap: ",
    );

    let file: PathBuf = dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let data = file.join("data").display().to_string();
    assert_one_line(
        "data dir under a file",
        run_to_exit(with(base, "--data-dir", &data)),
        &format!("ramsnapd: cannot create the data directory {data}: not a directory"),
    );
}
