//! The coordinator in-process over real gRPC, on SQLite (a file beside the
//! agents' domain) or on PostgreSQL (a database of its own, dropped by
//! [`InProc::finish`]), with the agents of [`super::Agents`]. For the tests
//! of the API's edges (`hardening.rs`, `burst.rs`).
use super::{serve, Agents, Env};
use ramsnap_common::tls::ClientTransport;
use ramsnap_snapshot::app::App;
use ramsnap_snapshot::db::Database;
use ramsnap_snapshot::{status, Coordinator, Options};
use sqlx::Executor as _;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use tokio::sync::oneshot;
use uuid::Uuid;

pub const PG_URL_VAR: &str = "RAMSNAP_TEST_PG_URL";

/// Which database the coordinator runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
}

pub struct InProc {
    pub env: Env,
    pub app: Arc<App>,
    pub db_url: String,
    coordinator_stop: Option<oneshot::Sender<()>>,
    /// (server URL, database name) of a PostgreSQL database to drop.
    pg: Option<(String, String)>,
}

impl Deref for InProc {
    type Target = Env;
    fn deref(&self) -> &Env {
        &self.env
    }
}

impl DerefMut for InProc {
    fn deref_mut(&mut self) -> &mut Env {
        &mut self.env
    }
}

/// The coordinator as `Coordinator::open` makes it, with these failpoints.
pub async fn open_coordinator(db_url: &str, failpoints: &str) -> Coordinator {
    open_coordinator_with(
        db_url,
        Options::new(ClientTransport::Insecure).failpoints(failpoints),
    )
    .await
}

/// [`open_coordinator`] with these options (the SQLite lock off all the same).
pub async fn open_coordinator_with(db_url: &str, options: Options) -> Coordinator {
    // The production start-up; the SQLite lock off, since a test opens a
    // new coordinator beside a halted one.
    let options = Options {
        sole_sqlite_user: false,
        ..options
    };
    let coordinator = Coordinator::connect_with_options(db_url, options).await.unwrap();
    coordinator.resume().await.unwrap();
    coordinator
}

/// `url` with its database name replaced by `name`.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let server = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    format!("{server}/{name}{query}")
}

fn pg_server_url() -> String {
    std::env::var(PG_URL_VAR).unwrap_or_else(|_| {
        panic!(
            "{PG_URL_VAR} is not set, so the PostgreSQL variant of this test cannot run. Start \
             PostgreSQL with `bash scripts/setup/postgres.sh` and run the tests with \
             {PG_URL_VAR}=postgres://ramsnap:ramsnap@127.0.0.1:5432/ramsnap"
        )
    })
}

impl InProc {
    pub async fn start(db: Db) -> InProc {
        InProc::start_with(db, "3.3", "").await
    }

    pub async fn start_with(db: Db, compatibility: &str, failpoints: &str) -> InProc {
        let agents = Agents::start().await;
        let (db_url, pg) = match db {
            Db::Sqlite => (
                format!("sqlite:{}", agents.dir.path().join("coordinator.db").display()),
                None,
            ),
            Db::Postgres => {
                let server = pg_server_url();
                let name = format!("rs_inproc_{}", Uuid::new_v4().simple());
                let admin = Database::connect(&server)
                    .await
                    .unwrap_or_else(|e| panic!("cannot connect to {server} ({PG_URL_VAR}): {e}"));
                admin
                    .pool()
                    .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .await
                    .expect("create a test database");
                admin.close().await;
                (with_database(&server, &name), Some((server, name)))
            }
        };
        let coordinator = open_coordinator(&db_url, failpoints).await;
        let (addr, coordinator_stop) = serve(coordinator.service_set()).await;
        let env = Env::new(agents, &addr, compatibility).await;
        InProc {
            env,
            app: coordinator.app.clone(),
            db_url,
            coordinator_stop: Some(coordinator_stop),
            pg,
        }
    }

    /// Stops the coordinator and drops its PostgreSQL database, if any.
    pub async fn finish(mut self) {
        for vm in self.app.db.list_vms().await.unwrap_or_default() {
            status::unfollow(&self.app, vm.id);
        }
        if let Some(stop) = self.coordinator_stop.take() {
            let _ = stop.send(());
        }
        self.app.db.close().await;
        if let Some((server, name)) = self.pg.take() {
            drop_database(&server, &name).await;
        }
    }
}

async fn drop_database(server: &str, name: &str) {
    let admin = Database::connect(server).await.expect("connect to drop");
    admin
        .pool()
        .execute(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .await
        .expect("drop a test database");
    admin.close().await;
}

impl Drop for InProc {
    fn drop(&mut self) {
        if let Some(s) = self.coordinator_stop.take() {
            let _ = s.send(());
        }
        // A test that panicked before finish(): drop its database anyway.
        if let Some((server, name)) = self.pg.take() {
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime to drop the database");
                rt.block_on(drop_database(&server, &name));
            })
            .join();
        }
    }
}
