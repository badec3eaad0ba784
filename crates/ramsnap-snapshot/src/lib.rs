//! SnapshotService: the coordinator. It keeps clusters, VMs and snapshots in
//! its database ([`db`]) and changes them through durable sagas ([`saga`],
//! [`sagas`]) that drive each host's StorageService and HostService over
//! gRPC ([`app`]).

pub mod app;
pub mod convert;
pub mod db;
pub mod error;
pub mod ovf;
pub mod peers;
pub mod saga;
pub mod sagas;
pub mod service;
pub mod status;
pub mod writers;

use app::App;
use ramsnap_common::limits::MessageLimits;
use ramsnap_common::server::ServiceSet;
use ramsnap_common::tls::ClientTransport;
use ramsnap_proto::snapshot::v1::{
    cluster_service_server::ClusterServiceServer, operation_service_server::OperationServiceServer,
    snapshot_service_server::SnapshotServiceServer, vm_service_server::VmServiceServer,
};
use std::sync::Arc;

/// How long the VM count waits after a VM changes, so that a burst of
/// changes is counted once.
const VM_COUNT_SETTLE: std::time::Duration = std::time::Duration::from_secs(1);
/// How often the VM count is taken when nothing is heard (a change the
/// events missed, e.g. a peer's while the notification link was down).
const VM_COUNT_BACKSTOP: std::time::Duration = std::time::Duration::from_secs(60);

/// The coordinator, ready to serve: database open and migrated, sagas left
/// unfinished by an earlier process resumed, VM status streams followed.
pub struct Coordinator {
    pub app: Arc<App>,
    /// On SQLite, the lock that keeps a second coordinator off the database
    /// (see [`Options::sole_sqlite_user`]); released when dropped.
    _sqlite_guard: Option<std::fs::File>,
}

/// How a coordinator is opened.
pub struct Options {
    /// How the agents are reached.
    pub transport: ClientTransport,
    /// Faults to inject (see [`saga::Failpoints`]); by default those of
    /// `RAMSNAP_FAILPOINTS`. Per instance, so that tests running several
    /// coordinators in one process need not share the environment.
    pub failpoints: saga::Failpoints,
    /// On SQLite, hold the database file for this coordinator alone: a
    /// second coordinator on the same file is refused at start, with an
    /// error naming the file (SQLite is the single-node embedded default;
    /// several coordinators need PostgreSQL). The lock goes with the
    /// process, so a restart after a crash is never refused. Off only for
    /// in-process crash simulations, which open a new coordinator beside a
    /// halted one that still lives in memory.
    pub sole_sqlite_user: bool,
    /// On PostgreSQL, this replica's lease: how long after it stops
    /// answering the other replicas adopt its sagas. By default
    /// `RAMSNAP_LEASE_MS`, or [`saga::DEFAULT_LEASE`].
    pub lease: std::time::Duration,
    /// How often WatchOperation re-reads an operation when nothing told
    /// it of a change: [`app::WATCH_BACKSTOP`] by default. Tests that must
    /// tell a pushed change from a polled one set it long.
    pub watch_backstop: std::time::Duration,
}

impl Options {
    pub fn new(transport: ClientTransport) -> Options {
        Options {
            transport,
            failpoints: saga::Failpoints::from_env(),
            sole_sqlite_user: true,
            lease: std::env::var("RAMSNAP_LEASE_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .map(std::time::Duration::from_millis)
                .unwrap_or(saga::DEFAULT_LEASE),
            watch_backstop: app::WATCH_BACKSTOP,
        }
    }

    /// These failpoints instead of the environment's.
    pub fn failpoints(mut self, spec: &str) -> Options {
        self.failpoints = saga::Failpoints::parse(spec);
        self
    }
}

impl Coordinator {
    /// [`Coordinator::connect`], then [`Coordinator::resume`] at once: for a
    /// coordinator whose agents run elsewhere.
    pub async fn open(database_url: &str) -> anyhow::Result<Coordinator> {
        let c = Coordinator::connect(database_url).await?;
        c.resume().await?;
        Ok(c)
    }

    /// [`Coordinator::connect_with_options`], then [`Coordinator::resume`].
    pub async fn open_with(database_url: &str, options: Options) -> anyhow::Result<Coordinator> {
        let c = Coordinator::connect_with_options(database_url, options).await?;
        c.resume().await?;
        Ok(c)
    }

    /// Opens and migrates the database; resumes nothing yet. The agents
    /// are reached in plain text (in-process tests): see [`Coordinator::connect_with`].
    pub async fn connect(database_url: &str) -> anyhow::Result<Coordinator> {
        Coordinator::connect_with(database_url, ClientTransport::Insecure).await
    }

    /// [`Coordinator::connect`], reaching the agents through `transport`.
    pub async fn connect_with(database_url: &str, transport: ClientTransport) -> anyhow::Result<Coordinator> {
        Coordinator::connect_with_options(database_url, Options::new(transport)).await
    }

    /// Opens and migrates the database as `options` say; resumes nothing yet.
    pub async fn connect_with_options(database_url: &str, options: Options) -> anyhow::Result<Coordinator> {
        let mut sqlite_guard = None;
        if let Some(path) = sqlite_path(database_url) {
            if let Some(dir) = path.parent() {
                if !dir.as_os_str().is_empty() {
                    std::fs::create_dir_all(dir)?;
                }
            }
            if options.sole_sqlite_user {
                sqlite_guard = Some(hold_sqlite(&path)?);
            }
        }
        let db = db::Database::connect(database_url).await?;
        db.migrate().await?;
        tracing::info!(backend = ?db.backend(), "database ready");
        let app = App::with_options(db.clone(), options.transport, options.watch_backstop);
        let notify_app = Arc::downgrade(&app);
        let exec = saga::Executor::new(
            db,
            app.clone(),
            sagas::all(),
            options.failpoints,
            Arc::new(move |op, now| {
                if let Some(app) = notify_app.upgrade() {
                    app.notify_operation(op, now);
                }
            }),
        );
        exec.set_lease(options.lease);
        let replica = exec.replica_id();
        app.set_executor(exec);
        if app.db.backend() == db::Backend::Postgres {
            app.set_peers(peers::start(&app, database_url, replica));
        }
        Ok(Coordinator {
            app,
            _sqlite_guard: sqlite_guard,
        })
    }

    /// Resumes the sagas an earlier process left unfinished and follows the
    /// running VMs' status. In the all-in-one process, called once its own
    /// agents answer: a saga resumed earlier would only find them absent.
    pub async fn resume(&self) -> anyhow::Result<()> {
        let resumed = self
            .app
            .executor()
            .recover()
            .await
            .map_err(|e| anyhow::anyhow!("resuming sagas: {e}"))?;
        if resumed > 0 {
            tracing::info!(resumed, "resumed unfinished sagas");
        }
        status::follow_running(&self.app).await;
        self.measure_vms();
        Ok(())
    }

    /// The `ramsnap_vms{status}` gauge (a scrape reads the last count):
    /// counted from the database when a VM changes (its own replica's
    /// changes and, on PostgreSQL, the peers'), at most once per
    /// [`VM_COUNT_SETTLE`], and every [`VM_COUNT_BACKSTOP`] in any case. The
    /// task ends when the coordinator is dropped.
    fn measure_vms(&self) {
        use std::sync::{Arc, Mutex};
        use tokio::sync::broadcast::error::RecvError;
        let counts: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
        let seen = counts.clone();
        let gauge = ramsnap_common::metrics::meter()
            .i64_observable_gauge("ramsnap.vms")
            .with_description("VMs by status")
            .with_callback(move |g| {
                for (status, n) in seen.lock().expect("vm counts").iter() {
                    g.observe(*n, &[opentelemetry::KeyValue::new("status", status.clone())]);
                }
            })
            .build();
        let app = Arc::downgrade(&self.app);
        let mut changes = self.app.vm_events.subscribe();
        tokio::spawn(async move {
            let _gauge = gauge;
            loop {
                let Some(app) = app.upgrade() else { return };
                if let Ok(now) = app.db.count_vms_by_status().await {
                    *counts.lock().expect("vm counts") = now;
                }
                drop(app);
                tokio::select! {
                    changed = changes.recv() => match changed {
                        Ok(_) | Err(RecvError::Lagged(_)) => {
                            // Let a burst of changes settle into one count.
                            tokio::time::sleep(VM_COUNT_SETTLE).await;
                            changes = changes.resubscribe();
                        }
                        Err(RecvError::Closed) => return,
                    },
                    _ = tokio::time::sleep(VM_COUNT_BACKSTOP) => {}
                }
            }
        });
    }

    pub fn service_set(&self) -> ServiceSet {
        let a = &self.app;
        ServiceSet::new(
            service::SERVICE_NAMES[0],
            ClusterServiceServer::new(service::cluster::ClusterApi(a.clone())).with_message_limits(),
        )
        .with(
            service::SERVICE_NAMES[1],
            VmServiceServer::new(service::vm::VmApi(a.clone())).with_message_limits(),
        )
        .with(
            service::SERVICE_NAMES[2],
            SnapshotServiceServer::new(service::snapshot::SnapshotApi(a.clone())).with_message_limits(),
        )
        .with(
            service::SERVICE_NAMES[3],
            OperationServiceServer::new(service::operation::OperationApi(a.clone())).with_message_limits(),
        )
    }

    /// Readiness for [`ramsnap_common::probe`]: ready while this replica
    /// holds a live lease (on SQLite: once its sagas are recovered).
    pub fn ready_check(&self) -> ramsnap_common::probe::ReadyCheck {
        let app = self.app.clone();
        Arc::new(move || {
            let exec = app.executor();
            exec.lease_status()
                .map(|left| {
                    format!(
                        "replica {} holds its lease for {} ms more",
                        exec.replica_id(),
                        left.as_millis()
                    )
                })
                .map_err(|why| format!("replica {}: {why}", exec.replica_id()))
        })
    }

    pub async fn close(&self) {
        self.app.executor().give_up_lease().await;
        self.app.db.close().await;
    }
}

/// The file of a `sqlite:` database URL (None for another database, or an
/// in-memory one).
fn sqlite_path(database_url: &str) -> Option<std::path::PathBuf> {
    let rest = database_url.strip_prefix("sqlite:")?;
    let path = rest.trim_start_matches("//");
    let path = path.split('?').next().unwrap_or_default();
    (!path.is_empty() && path != ":memory:").then(|| std::path::PathBuf::from(path))
}

/// Takes the lock that says a coordinator uses the SQLite database `path`:
/// an exclusive lock on `<path>.coordinator.lock`, held while the returned
/// file is open, and gone with the process however it ends.
fn hold_sqlite(path: &std::path::Path) -> anyhow::Result<std::fs::File> {
    let mut name = path.as_os_str().to_owned();
    name.push(".coordinator.lock");
    let lock_path = std::path::PathBuf::from(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&lock_path)
        .map_err(|e| anyhow::anyhow!("opening {}: {e}", lock_path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(anyhow::anyhow!(
            "another coordinator is using the SQLite database {} (it holds {}): SQLite serves one \
             coordinator; stop the other one, or run several coordinators on PostgreSQL",
            path.display(),
            lock_path.display()
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(anyhow::anyhow!("locking {}: {e}", lock_path.display())),
    }
}
