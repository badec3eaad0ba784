//! Support for end-to-end tests: the real binaries, spawned on port 0 with
//! per-test directories, and the clients that talk to them (grpcurl and tonic).
//!
//! The binaries are not built by `cargo test`; build them first:
//! `cargo build --workspace --bins && cargo test -p ramsnap-e2e`.
//!
//! [`cluster`] runs the whole system for one test (the three binaries, a
//! FILE and a BLOCK domain, the test guest of [`guest`] on the local
//! libvirt); [`console`] parses the guest's console.
pub mod cluster;
pub mod console;
pub mod faults;
pub mod guest;
pub mod logs;
pub mod ovirt;

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// How long a binary may take to print its "listening" lines.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a binary may take to exit after SIGTERM before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a restart waits for its ports to be free again.
const PORT_WAIT: Duration = Duration::from_secs(15);

/// Waits up to `limit` until every address in `addrs` can be bound (as
/// the process will: SO_REUSEADDR, which std sets, so a TIME_WAIT does
/// not count). A restarted process takes the ports its first run had,
/// which the kernel chose from the ephemeral range: while it was down,
/// any socket on the machine may have been given one (a client of
/// another test binary, or a reconnect to the dead port that loopback
/// connects to itself), and one held briefly must not fail the test.
fn wait_until_free(addrs: &[SocketAddr], limit: Duration) {
    let deadline = Instant::now() + limit;
    for addr in addrs.iter().filter(|a| a.port() != 0) {
        while std::net::TcpListener::bind(addr).is_err_and(|e| e.kind() == std::io::ErrorKind::AddrInUse)
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A spawned service binary. Dropping it stops the process (SIGTERM, then
/// SIGKILL after [`STOP_TIMEOUT`]).
pub struct Running {
    /// The first (for most binaries the only) bound address.
    pub addr: SocketAddr,
    /// Every bound address by service name ("storage", "host", "snapshot").
    pub addrs: HashMap<String, SocketAddr>,
    child: Option<Child>,
    binary: String,
    args: Vec<OsString>,
    /// The process's directories and its stderr log; removed on drop.
    pub dir: TempDir,
}

/// Where `cargo build` put binary `name`: beside the test executable's
/// `deps/` directory (`target/<profile>/<name>`).
pub fn binary_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .unwrap_or_else(|| panic!("unexpected test executable location {}", exe.display()));
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "binary {name} not found at {}: build the binaries first with `cargo build --workspace --bins`",
        path.display()
    );
    path
}

/// Spawns `binary` with `--listen 127.0.0.1:0` and `args`, and waits for its
/// "listening" line.
pub fn spawn_service(binary: &str, args: &[&str]) -> Running {
    let dir = tempdir();
    let mut all: Vec<OsString> = vec!["--listen".into(), "127.0.0.1:0".into()];
    all.extend(args.iter().map(OsString::from));
    spawn(binary, all, 1, dir)
}

/// The storage agent, with its own state, run and file-root directories.
/// Its BLOCK discovery is limited to a device that does not exist, so that it
/// never adopts the volume groups of other tests or of the host.
pub fn spawn_storage() -> Running {
    spawn_storage_with(&[])
}

/// [`spawn_storage`] with more arguments (`--tls-dir DIR`: certificates
/// other than this test process's).
pub fn spawn_storage_with(extra: &[&str]) -> Running {
    let dir = tempdir();
    let d = dir.path();
    std::fs::create_dir_all(d.join("domains")).expect("creating the file root");
    let mut args: Vec<OsString> = vec![
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--state-dir".into(),
        d.join("state").into(),
        "--run-dir".into(),
        d.join("run").into(),
        "--file-root".into(),
        d.join("domains").into(),
        "--block-device".into(),
        d.join("no-such-device").into(),
    ];
    args.extend(extra.iter().map(OsString::from));
    spawn("ramsnap-storage", args, 1, dir)
}

/// The coordinator, with its SQLite database in its temp dir.
pub fn spawn_snapshot() -> Running {
    let dir = tempdir();
    let db = format!("sqlite:{}", dir.path().join("coordinator.db").display());
    let args: Vec<OsString> = vec![
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--database-url".into(),
        db.into(),
    ];
    spawn("ramsnap-snapshot", args, 1, dir)
}

/// ramsnapd: all three services, each on a port of its own, with the data
/// directory (so also the coordinator's database and the storage agent's
/// state) and the run directory in a temp dir.
pub fn spawn_ramsnapd() -> Running {
    let dir = tempdir();
    let d = dir.path();
    let args: Vec<OsString> = vec![
        "--snapshot-listen".into(),
        "127.0.0.1:0".into(),
        "--storage-listen".into(),
        "127.0.0.1:0".into(),
        "--host-listen".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        d.join("data").into(),
        "--run-dir".into(),
        d.join("run").into(),
        "--block-device".into(),
        d.join("no-such-device").into(),
    ];
    spawn("ramsnapd", args, 3, dir)
}

/// The dev certificates (a CA, one certificate per service and per role)
/// that every binary of this test process serves with (`--tls-dir`) and
/// every client presents (`admin` unless told otherwise): the end-to-end
/// tests run with mutual TLS on, as a deployment does.
pub fn tls_dir() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ramsnap-tls-e2e-{}", std::process::id()));
        ramsnap_common::devcerts::ensure_dev_certs(&dir).expect("making the dev certificates");
        dir
    })
}

/// How test clients reach the binaries: TLS, presenting `identity`'s dev
/// certificate (admin, operator, viewer, coordinator, ...).
pub fn transport_as(identity: &str) -> ramsnap_common::tls::ClientTransport {
    let files = ramsnap_common::tls::TlsFiles::in_dir(tls_dir(), identity);
    ramsnap_common::tls::ClientTransport::Tls(
        ramsnap_common::tls::ClientTls::new(files).expect("a dev client certificate"),
    )
}

/// A channel to `addr` (`host:port` or a URI) as `identity`.
pub async fn connect_as(addr: &str, identity: &str) -> tonic::transport::Channel {
    let transport = transport_as(identity);
    let ep = transport.endpoint(addr).expect("a valid address");
    transport
        .connect(&ep)
        .await
        .unwrap_or_else(|e| panic!("connecting to {addr} as {identity}: {e}"))
}

/// grpcurl's flags for the dev certificates, as `admin`.
pub fn grpcurl_tls() -> Vec<String> {
    let d = tls_dir();
    vec![
        "-cacert".into(),
        d.join("ca.pem").display().to_string(),
        "-cert".into(),
        d.join("admin.pem").display().to_string(),
        "-key".into(),
        d.join("admin.key").display().to_string(),
    ]
}

fn tempdir() -> TempDir {
    tempfile::Builder::new()
        .prefix("ramsnap-e2e-")
        .tempdir()
        .expect("creating a temp dir")
}

/// Spawns `binary` and reads `listeners` "listening" lines from its stdout.
/// Its stderr (the logs) goes to `<dir>/stderr.log`, shown when it fails.
pub fn spawn(binary: &str, args: Vec<OsString>, listeners: usize, dir: TempDir) -> Running {
    spawn_env(binary, args, listeners, dir, &[])
}

/// [`spawn`] with these environment variables set (failpoints, say).
pub fn spawn_env(
    binary: &str,
    args: Vec<OsString>,
    listeners: usize,
    dir: TempDir,
    env: &[(&str, &str)],
) -> Running {
    let path = binary_path(binary);
    let log = dir.path().join("stderr.log");
    // Appended to: a restarted process adds to its predecessor's log.
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .expect("creating the stderr log");
    let mut command = Command::new(&path);
    command.args(&args);
    // This test process's dev certificates, unless told otherwise.
    if !args
        .iter()
        .any(|a| a == "--tls-dir" || a == "--tls-cert" || a == "--insecure")
    {
        command.arg("--tls-dir").arg(tls_dir());
    }
    // A collector of the developer's shell is not the tests'; one a test
    // names (`env`) is.
    command
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr);
    // A test process that is killed (no drop runs) must not leave its
    // services running: they get SIGTERM when the thread that spawned them
    // (the test's) goes away.
    // SAFETY: prctl(2) is async-signal-safe; nothing else runs in the child.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {}: {e}", path.display()));

    // A thread reads stdout (to its end, so the child never blocks on a full
    // pipe) and hands the lines over; the wait for them is bounded.
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let mut running = Running {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        addrs: HashMap::new(),
        child: Some(child),
        binary: binary.into(),
        args,
        dir,
    };
    let deadline = Instant::now() + START_TIMEOUT;
    while running.addrs.len() < listeners {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match rx.recv_timeout(left) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!(
                    "{binary} did not report listening within {START_TIMEOUT:?}\n{}",
                    running.logs()
                )
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = running.child.as_mut().and_then(|c| c.wait().ok());
                panic!(
                    "{binary} closed its stdout before listening (exit: {status:?})\n{}",
                    running.logs()
                )
            }
        };
        let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if event["event"] != "listening" {
            continue;
        }
        let service = event["service"].as_str().unwrap_or_default().to_string();
        let addr: SocketAddr = event["addr"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("{binary} printed a listening line without an address: {line}"));
        if running.addrs.is_empty() {
            running.addr = addr;
        }
        running.addrs.insert(service, addr);
    }
    running
}

impl Running {
    /// The address of one service of a multi-service binary.
    pub fn addr_of(&self, service: &str) -> SocketAddr {
        *self
            .addrs
            .get(service)
            .unwrap_or_else(|| panic!("{} reported no {service} listener", self.binary))
    }

    /// The process's logs so far, for failure messages.
    pub fn logs(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default();
        format!(
            "--- {} stderr ---\n{text}--- end of {} stderr ---",
            self.binary, self.binary
        )
    }

    /// Waits up to `timeout` for the process to exit by itself (a
    /// failpoint's exit); None if it still runs.
    pub fn exited_within(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, as a crash: nothing of the process's shutdown runs.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the binary again after it ended (killed, or exited at a
    /// failpoint): the same arguments and directories, the same ports, and
    /// these environment variables.
    pub fn restart(&mut self, env: &[(&str, &str)]) {
        self.kill();
        let listen = |flag: &str| match flag {
            "--listen" => Some(self.addr),
            "--snapshot-listen" => self.addrs.get("snapshot").copied(),
            "--storage-listen" => self.addrs.get("storage").copied(),
            "--host-listen" => self.addrs.get("host").copied(),
            _ => None,
        };
        let mut args = self.args.clone();
        for i in 1..args.len() {
            if let Some(a) = args[i - 1].to_str().and_then(listen) {
                args[i] = a.to_string().into();
            }
        }
        let listeners = self.addrs.len().max(1);
        let mut ports: Vec<SocketAddr> = self.addrs.values().copied().collect();
        ports.push(self.addr);
        wait_until_free(&ports, PORT_WAIT);
        let dir = std::mem::replace(&mut self.dir, tempdir());
        *self = spawn_env(&self.binary, args, listeners, dir, env);
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit. Returns the exit
    /// status, or None when the process had to be killed.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let pid = child.id() as libc::pid_t;
        // SAFETY: kill(2) on a pid we spawned and have not reaped yet.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        // Wait on a thread so the wait can be bounded without polling.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        match rx.recv_timeout(timeout) {
            Ok(status) => status.ok(),
            Err(_) => {
                // SAFETY: as above; the waiting thread reaps it afterwards.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                let _ = rx.recv_timeout(timeout);
                None
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.terminate(STOP_TIMEOUT);
    }
}

/// Runs grpcurl with `args`. Fails the test, with the way to install it,
/// when grpcurl is not on PATH: a missing tool must never pass as a skip.
pub fn grpcurl(args: &[&str]) -> Output {
    let tool = std::env::var("GRPCURL").unwrap_or_else(|_| "grpcurl".into());
    Command::new(&tool)
        .args(grpcurl_tls())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `{tool}` ({e}): the end-to-end tests need grpcurl on PATH \
             (install it with scripts/setup/tools.sh, or scripts/setup.sh for everything)"
            )
        })
}

/// Runs grpcurl and returns its stdout; fails the test with grpcurl's stderr
/// when it exits non-zero.
pub fn grpcurl_ok(args: &[&str]) -> String {
    let out = grpcurl(args);
    assert!(
        out.status.success(),
        "grpcurl {} failed ({}):\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("grpcurl prints UTF-8")
}

/// The services `grpcurl list` reports at `addr`.
pub fn grpcurl_list(addr: SocketAddr) -> Vec<String> {
    grpcurl_ok(&[&addr.to_string(), "list"])
        .lines()
        .map(str::to_string)
        .collect()
}

/// The status grpc.health.v1.Health/Check reports for `service` ("" is the
/// whole server), asked through grpcurl.
pub fn grpcurl_health_check(addr: SocketAddr, service: &str) -> String {
    let request = serde_json::json!({ "service": service }).to_string();
    let out = grpcurl_ok(&["-d", &request, &addr.to_string(), "grpc.health.v1.Health/Check"]);
    let reply: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("grpcurl printed no JSON ({e}): {out}"));
    reply["status"].as_str().unwrap_or_default().to_string()
}

/// The status grpc.health.v1.Health/Check reports for `service`, asked
/// through tonic-health's client.
pub async fn health_check(addr: SocketAddr, service: &str) -> ServingStatus {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let mut client = HealthClient::new(connect(addr).await);
    let reply = client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("Health/Check({service:?}) at {addr}: {e}"))
        .into_inner();
    reply.status()
}

pub use tonic_health::pb::health_check_response::ServingStatus;

/// Which version of the gRPC reflection API to speak.
#[derive(Clone, Copy, Debug)]
pub enum Reflection {
    V1,
    V1Alpha,
}

/// The services listed by reflection API `version` at `addr`, asked through
/// tonic-reflection's generated client for exactly that version.
pub async fn reflection_list(addr: SocketAddr, version: Reflection) -> Vec<String> {
    // v1 and v1alpha are the same protocol in two packages: one body, two sets of types.
    macro_rules! list_services {
        ($v:ident) => {{
            use tonic_reflection::pb::$v::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::$v::server_reflection_request::MessageRequest;
            use tonic_reflection::pb::$v::server_reflection_response::MessageResponse;
            use tonic_reflection::pb::$v::ServerReflectionRequest;
            let request = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let mut replies = ServerReflectionClient::new(connect(addr).await)
                .server_reflection_info(tokio_stream::iter([request]))
                .await
                .unwrap_or_else(|e| panic!("reflection {version:?} at {addr}: {e}"))
                .into_inner();
            match replies.message().await {
                Ok(Some(reply)) => match reply.message_response {
                    Some(MessageResponse::ListServicesResponse(list)) => {
                        list.service.into_iter().map(|s| s.name).collect()
                    }
                    other => panic!("reflection {version:?} at {addr} answered {other:?}"),
                },
                other => panic!("reflection {version:?} at {addr} answered {other:?}"),
            }
        }};
    }
    match version {
        Reflection::V1 => list_services!(v1),
        Reflection::V1Alpha => list_services!(v1alpha),
    }
}

async fn connect(addr: SocketAddr) -> tonic::transport::Channel {
    connect_as(&addr.to_string(), "admin").await
}
