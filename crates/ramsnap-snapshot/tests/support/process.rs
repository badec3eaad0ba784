//! The coordinator as a process of its own (`target/debug/ramsnap-snapshot`)
//! and the databases it runs on, for the tests that kill, freeze and
//! restart it (`crash_restart.rs`, `replicas.rs`).
use super::inproc::with_database;
use ramsnap_snapshot::db::Database;
use sqlx::Executor;
use std::io::{BufRead, BufReader as StdBufReader};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use uuid::Uuid;

/// The exit code of a coordinator stopped by a `crash` failpoint.
pub const CRASH_EXIT_CODE: i32 = 86;
pub const PG_URL_VAR: &str = "RAMSNAP_TEST_PG_URL";
/// How long a coordinator may take to listen, or to reach a failpoint.
pub const PROCESS_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// The coordinator process.

/// `target/debug/ramsnap-snapshot`, beside the directory of this test binary
/// (`target/debug/deps/crash_restart-<hash>`).
pub fn coordinator_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join(format!("ramsnap-snapshot{}", std::env::consts::EXE_SUFFIX)));
    match bin {
        Some(bin) if bin.is_file() => bin,
        other => panic!(
            "the coordinator binary is missing (looked for {other:?} beside the test binary {}): \
             run cargo build --workspace --bins",
            exe.display()
        ),
    }
}

/// A `ramsnap-snapshot` process. Killed when dropped.
pub struct CoordinatorProcess {
    pub child: Child,
    /// `http://127.0.0.1:PORT`, from its "listening" line.
    pub addr: String,
    pub log: PathBuf,
}

impl CoordinatorProcess {
    /// Starts the coordinator on `db_url`, listening on a free port, with
    /// these failpoints (none: the variable is removed), its log (stderr) in
    /// `log`; returns once it listens.
    pub async fn start(db_url: &str, failpoints: Option<&str>, log: PathBuf) -> CoordinatorProcess {
        CoordinatorProcess::start_with(db_url, failpoints, log, &[]).await
    }

    /// [`CoordinatorProcess::start`] with more environment variables.
    pub async fn start_with(
        db_url: &str,
        failpoints: Option<&str>,
        log: PathBuf,
        env: &[(&str, String)],
    ) -> CoordinatorProcess {
        let mut cmd = Command::new(coordinator_binary());
        // The agents are in this test process, plain text on loopback.
        cmd.arg("--insecure")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--database-url")
            .arg(db_url)
            .env_remove("RAMSNAP_FAILPOINTS")
            .env_remove("RAMSNAP_SNAPSHOT_LISTEN")
            .env_remove("RAMSNAP_DATABASE_URL")
            .env_remove("RAMSNAP_LOG_FORMAT")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("coordinator log file"))
            .kill_on_drop(true);
        if let Some(f) = failpoints {
            cmd.env("RAMSNAP_FAILPOINTS", f);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start the coordinator binary");
        let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let line = tokio::time::timeout(PROCESS_TIMEOUT, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("the coordinator did not listen in time; log:\n{}", tail(&log)))
            .expect("read the coordinator's stdout")
            .unwrap_or_else(|| panic!("the coordinator exited before listening; log:\n{}", tail(&log)));
        let event: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("not a JSON line on the coordinator's stdout ({e}): {line}"));
        assert_eq!(event["event"], "listening", "{line}");
        let addr = event["addr"]
            .as_str()
            .unwrap_or_else(|| panic!("no address in {line}"));
        // Nothing else is expected on stdout; read it all the same, so that
        // a write never fails on a closed pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        CoordinatorProcess {
            child,
            addr: format!("http://{addr}"),
            log,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id().expect("the coordinator runs") as i32
    }

    /// Sends `signal` (SIGSTOP, SIGCONT, ...) to the process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on the PID of a child this test spawned and has
        // not reaped.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(
            rc,
            0,
            "kill({}, {signal}): {}",
            self.pid(),
            std::io::Error::last_os_error()
        );
    }

    /// Kills the process (SIGKILL: everything it did is in the database).
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }

    /// Waits for the process to exit by itself.
    pub async fn exited(mut self) -> ExitStatus {
        match tokio::time::timeout(PROCESS_TIMEOUT, self.child.wait()).await {
            Ok(status) => status.expect("wait for the coordinator"),
            Err(_) => panic!(
                "the coordinator did not exit: the failpoint did not fire; log:\n{}",
                tail(&self.log)
            ),
        }
    }
}

/// The last lines of a log file.
pub fn tail(path: &Path) -> String {
    let Ok(f) = std::fs::File::open(path) else {
        return format!("({} unreadable)", path.display());
    };
    let lines: Vec<String> = StdBufReader::new(f).lines().map_while(Result::ok).collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

// ---------------------------------------------------------------------------
// The databases.

#[derive(Clone)]
pub enum Backend {
    Sqlite,
    /// The server's URL, and the databases made on it (dropped at the end
    /// of the test, whatever its outcome).
    Postgres {
        server_url: String,
        made: Arc<Mutex<Vec<String>>>,
    },
}

impl Backend {
    pub fn postgres() -> Backend {
        let server_url = std::env::var(PG_URL_VAR).unwrap_or_else(|_| {
            panic!(
                "{PG_URL_VAR} is not set, so the PostgreSQL variant of this test cannot run. Start \
                 PostgreSQL with `bash scripts/setup/postgres.sh` and run the tests with \
                 {PG_URL_VAR}=postgres://ramsnap:ramsnap@127.0.0.1:5432/ramsnap"
            )
        });
        Backend::Postgres {
            server_url,
            made: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// A fresh database: a SQLite file in `dir`, or a new PostgreSQL database.
    pub async fn fresh_database(&self, dir: &Path) -> String {
        match self {
            Backend::Sqlite => format!("sqlite:{}", dir.join("coordinator.db").display()),
            Backend::Postgres { server_url, made } => {
                let name = format!("rs_crash_{}", Uuid::new_v4().simple());
                let admin = Database::connect(server_url)
                    .await
                    .unwrap_or_else(|e| panic!("cannot connect to {server_url} ({PG_URL_VAR}): {e}"));
                admin
                    .pool()
                    .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .await
                    .expect("create a test database");
                admin.close().await;
                made.lock().unwrap().push(name.clone());
                with_database(server_url, &name)
            }
        }
    }

    pub async fn drop_databases(&self) {
        let Backend::Postgres { server_url, made } = self else {
            return;
        };
        let names: Vec<String> = std::mem::take(&mut *made.lock().unwrap());
        if names.is_empty() {
            return;
        }
        let admin = Database::connect(server_url).await.expect("connect to drop");
        for name in names {
            admin
                .pool()
                .execute(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .await
                .expect("drop a test database");
        }
        admin.close().await;
    }
}
