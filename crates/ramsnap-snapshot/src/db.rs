//! The coordinator's persistence: clusters and their hosts, VMs, snapshots
//! (with their disks and memory volumes), long-running operations and the
//! saga log. `flows` holds the snapshot model's state changes (take, preview,
//! undo, commit, stateless run), each one idempotent transaction.
//!
//! One schema (`migrations/` at the workspace root) and one text per query
//! serve both PostgreSQL and SQLite through sqlx's `Any` driver: queries use
//! `$1, $2` placeholders, which both drivers accept. Ids are UUIDs stored as
//! hyphenated TEXT; timestamps are unix milliseconds.

/// A query text assembled from this module's constant fragments (column
/// lists, shared clauses) with `format!`: never from caller input, which is
/// always bound as a parameter. sqlx 0.9 asks for that to be asserted.
macro_rules! sql {
    ($($t:tt)*) => {
        sqlx::AssertSqlSafe(format!($($t)*))
    };
}

/// Runs `$body`, an `async` block that returns `Result<_, DbError>`, and
/// runs it again (a fresh block each time) when it fails with a transient
/// error ([`DbError::is_transient`]): a transaction's body is the unit, it
/// starts over from its BEGIN.
macro_rules! retry_transient {
    ($body:expr) => {{
        let mut attempt = 0u32;
        loop {
            let result: Result<_, $crate::db::DbError> = $body.await;
            match result {
                Err(e) if e.is_transient() && attempt < $crate::db::TRANSIENT_RETRIES => {
                    attempt += 1;
                    tracing::debug!(attempt, error = %e, "transient database error; retrying");
                    tokio::time::sleep($crate::db::transient_backoff(attempt)).await;
                }
                other => break other,
            }
        }
    }};
}

mod cache;
mod clusters;
mod flows;
mod hosts;
mod operations;
mod replicas;
mod sagas;
mod snapshots;
mod vms;
mod writers;

pub use clusters::{Cluster, CompatibilityVersion, NewCluster};
pub use hosts::{Host, NewHost};
pub use operations::{Accepted, NewOperation, Operation, OperationState};
pub use replicas::{NewReplica, Replica};
pub use sagas::{NewSaga, PendingEvent, Saga, SagaNodeEvent, SagaNodeEventType, SagaOwner, SagaState};
pub use snapshots::{
    MemoryVolume, NewSnapshot, Snapshot, SnapshotDisk, SnapshotStatus, SnapshotType, VolumeRef,
};
pub use vms::{NewVm, Vm, VmDisk, VmSnapshotState, VmStatus};

use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::error::ErrorKind;
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, ConnectOptions, Connection, Executor, Row};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use uuid::Uuid;

static MIGRATOR: Migrator = sqlx::migrate!("../../migrations");

/// What can go wrong in the persistence layer.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("{kind} {id} not found")]
    NotFound { kind: &'static str, id: String },
    /// A uniqueness rule was broken (same id, same name, a second active
    /// snapshot, a reused request id), or a state change was refused.
    #[error("{kind} {id}: {message}")]
    Conflict {
        kind: &'static str,
        id: String,
        message: String,
    },
    /// The row refers to a row that does not exist, or is still referred to.
    #[error("{kind} {id}: {message}")]
    ForeignKey {
        kind: &'static str,
        id: String,
        message: String,
    },
    #[error("vm {vm_id} is locked by operation {holder}")]
    VmLocked { vm_id: Uuid, holder: Uuid },
    /// A saga-log write by a replica that no longer owns the saga: another
    /// adopted it (its generation moved on past `generation`).
    #[error("saga {saga} was adopted by another coordinator (this one wrote as generation {generation})")]
    StaleOwner { saga: Uuid, generation: i64 },
    #[error("{field}: {message}")]
    InvalidValue { field: &'static str, message: String },
    /// A change the state of other rows forbids (a host a VM runs on, a
    /// cluster that still has VMs): FAILED_PRECONDITION `kind` on `subject`.
    #[error("{message}")]
    Refused {
        kind: &'static str,
        subject: String,
        message: String,
    },
    #[error(transparent)]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Sqlx(#[from] sqlx::Error),
}

impl DbError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, DbError::NotFound { .. })
    }

    /// A failure that running the same transaction again may not meet:
    /// PostgreSQL's serialization_failure (40001), deadlock_detected
    /// (40P01) and lock_not_available (55P03); SQLite's BUSY and LOCKED
    /// (primary codes 5 and 6, with their extended codes).
    pub fn is_transient(&self) -> bool {
        let DbError::Sqlx(sqlx::Error::Database(e)) = self else {
            return false;
        };
        let Some(code) = e.code() else { return false };
        match code.as_ref() {
            "40001" | "40P01" | "55P03" => true,
            sqlite => sqlite.parse::<i32>().is_ok_and(|n| matches!(n & 0xff, 5 | 6)),
        }
    }

    pub(crate) fn not_found(kind: &'static str, id: impl ToString) -> Self {
        DbError::NotFound {
            kind,
            id: id.to_string(),
        }
    }

    /// Classifies a failed write: constraint violations become [`DbError::Conflict`]
    /// or [`DbError::ForeignKey`] naming the row, anything else stays a sqlx error.
    pub(crate) fn on_write(kind: &'static str, id: impl ToString) -> impl FnOnce(sqlx::Error) -> DbError {
        move |err| {
            let sqlx::Error::Database(db_err) = &err else {
                return DbError::Sqlx(err);
            };
            let message = db_err.message().to_owned();
            match db_err.kind() {
                ErrorKind::UniqueViolation => DbError::Conflict {
                    kind,
                    id: id.to_string(),
                    message,
                },
                ErrorKind::ForeignKeyViolation => DbError::ForeignKey {
                    kind,
                    id: id.to_string(),
                    message,
                },
                _ => DbError::Sqlx(err),
            }
        }
    }
}

/// Which database a [`Database`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// A pool of connections to the coordinator's database. Cheap to clone.
///
/// Writers are serialized on SQLite: every statement that writes, and every
/// transaction, goes through `writer`, a pool of ONE connection, and
/// transactions begin with `BEGIN IMMEDIATE`. SQLite has one writer at a
/// time anyway; without this, a deferred transaction that reads and then
/// writes fails with SQLITE_BUSY at once when another connection wrote in
/// between (busy_timeout does not apply to that upgrade), which is what a
/// burst of concurrent calls hit. Reads go through `pool` and run beside the
/// writer (WAL). On PostgreSQL both are the same pool, and transactions that
/// fail with a serialization failure or a deadlock are run again.
#[derive(Debug, Clone)]
pub struct Database {
    pool: AnyPool,
    writer: AnyPool,
    backend: Backend,
    /// The saga log's writer (see [`Database::append_saga_node_events`]).
    appender: tokio::sync::mpsc::UnboundedSender<sagas::AppendJob>,
    /// Set on a saga's handle ([`Database::for_saga`]): every write made
    /// through it is refused with [`DbError::StaleOwner`] once another
    /// replica has adopted the saga.
    owner: Option<SagaOwner>,
    /// Hosts and clusters as hot paths read them (see [`cache`]).
    rows: std::sync::Arc<cache::RowCache>,
}

/// How often a transaction that failed with a transient error is run again.
pub(crate) const TRANSIENT_RETRIES: u32 = 10;

pub(crate) fn transient_backoff(attempt: u32) -> Duration {
    // 10, 20, 40, ... 1280 ms, with jitter so that retried twins diverge.
    let base = 10u64 << attempt.min(7);
    let jitter = u64::from(Uuid::new_v4().as_bytes()[0]) % (base / 2 + 1);
    Duration::from_millis(base + jitter)
}

impl Database {
    /// Connects to `postgres://...` or `sqlite:...`. A SQLite file is created
    /// if missing, switched to WAL and used with foreign keys on.
    pub async fn connect(url: &str) -> Result<Database, DbError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            return Err(DbError::InvalidValue {
                field: "database url",
                message: "must start with postgres://, postgresql:// or sqlite:".into(),
            });
        };
        let (pool, writer) = match backend {
            Backend::Postgres => {
                let pool = pool_options()
                    .max_connections(16)
                    .acquire_timeout(Duration::from_secs(60))
                    .connect(url)
                    .await?;
                (pool.clone(), pool)
            }
            Backend::Sqlite => connect_sqlite(url).await?,
        };
        let (appender, jobs) = tokio::sync::mpsc::unbounded_channel();
        let db = Database {
            pool,
            writer,
            backend,
            appender,
            owner: None,
            rows: Default::default(),
        };
        // The writer holds a handle without the sender, so that it ends
        // when the last handle is dropped.
        let (closed, _) = tokio::sync::mpsc::unbounded_channel();
        let handle = Database {
            appender: closed,
            ..db.clone()
        };
        tokio::spawn(sagas::log_writer(handle, jobs));
        Ok(db)
    }

    /// Applies the migrations that have not been applied yet.
    pub async fn migrate(&self) -> Result<(), DbError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The pool, for queries this module does not offer (reads; on SQLite a
    /// write through it waits for the writer up to busy_timeout).
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Where statements that write go (see [`Database`]).
    pub(crate) fn writer(&self) -> &AnyPool {
        &self.writer
    }

    /// This database as a saga's nodes write to it: every write is
    /// conditional on the saga being owned at `owner`'s generation. Write
    /// transactions check it first (on PostgreSQL under `FOR SHARE`, so
    /// that an adoption waits for them or they see it); single statements
    /// run in such a transaction.
    pub fn for_saga(&self, owner: SagaOwner) -> Database {
        Database {
            owner: Some(owner),
            ..self.clone()
        }
    }

    /// A write transaction: `BEGIN IMMEDIATE` on SQLite (the write lock is
    /// taken at the start, never upgraded from a read), `BEGIN` on PostgreSQL.
    /// On a saga's handle, refused as [`DbError::StaleOwner`] unless the saga
    /// is still owned at its generation.
    pub(crate) async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, DbError> {
        let mut tx = match self.backend {
            Backend::Sqlite => self.writer.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.writer.begin().await?,
        };
        if let Some(owner) = self.owner {
            sagas::hold_owner(&mut tx, self.backend, owner).await?;
        }
        Ok(tx)
    }

    /// Runs one write statement: on a saga's handle, in a transaction that
    /// checks the saga's owner first (see [`Database::begin_write`]).
    pub(crate) async fn execute_write<'q>(
        &self,
        query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
    ) -> Result<sqlx::any::AnyQueryResult, DbError> {
        if self.owner.is_none() {
            return Ok(query.execute(self.writer()).await?);
        }
        let mut tx = self.begin_write().await?;
        let result = query.execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(result)
    }

    /// Closes every connection; waits for those in use to be returned.
    pub async fn close(&self) {
        self.writer.close().await;
        self.pool.close().await;
    }
}

/// The SQLite pools: (readers, the one writer). An in-memory database has
/// one connection (each connection to ":memory:" is a database of its own),
/// which is both.
async fn connect_sqlite(url: &str) -> Result<(AnyPool, AnyPool), DbError> {
    let in_memory = url.contains(":memory:") || url.contains("mode=memory");
    let url = if in_memory || url.contains("mode=") {
        url.to_owned()
    } else {
        let separator = if url.contains('?') { '&' } else { '?' };
        format!("{url}{separator}mode=rwc")
    };
    let options = AnyConnectOptions::from_str(&url)?;
    if !in_memory {
        // WAL is a property of the file, and switching to it takes a lock that
        // busy_timeout does not wait for: do it once, before the pool exists.
        let mut conn = options.connect().await?;
        conn.execute("PRAGMA journal_mode = WAL").await?;
        conn.close().await?;
    }
    let pool_options = pool_options()
        .after_connect(|conn, _meta| {
            Box::pin(async move {
                conn.execute("PRAGMA foreign_keys = ON").await?;
                // Another process writing the same file (in-process writers
                // are serialized): wait for it rather than fail.
                conn.execute("PRAGMA busy_timeout = 30000").await?;
                Ok(())
            })
        })
        .max_connections(if in_memory { 1 } else { 8 });
    // Every connection to ":memory:" is a database of its own: keep the one.
    if in_memory {
        let pool = pool_options
            .idle_timeout(None)
            .max_lifetime(None)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(120))
            .connect_with(options)
            .await?;
        return Ok((pool.clone(), pool));
    }
    let readers = pool_options
        .clone()
        .acquire_timeout(Duration::from_secs(60))
        .connect_with(options.clone())
        .await?;
    // Writers queue for the one connection: each waits for those before it,
    // a few milliseconds each, so a burst of hundreds waits seconds.
    let writer = pool_options
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(120))
        .connect_with(options)
        .await?;
    Ok((readers, writer))
}

/// How long a pooled connection may sit idle before it is checked (a
/// round trip) when it is next handed out.
const PING_AFTER_IDLE: Duration = Duration::from_secs(5);

/// The options every pool starts from. sqlx checks each connection with a
/// round trip every time it is handed out; under load that doubled the
/// round trips a saga makes (one per statement outside a transaction).
/// Here only a connection idle for [`PING_AFTER_IDLE`] is checked, which
/// still finds those the server closed while the coordinator was quiet (a
/// restart, an idle timeout). One that dies in use fails its statement, and
/// the pool drops it.
fn pool_options() -> AnyPoolOptions {
    AnyPoolOptions::new()
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_AFTER_IDLE {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
}

/// Now, in unix milliseconds.
pub(crate) fn now_ms() -> i64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

/// Converts an unsigned quantity to the BIGINT it is stored as.
pub(crate) fn to_bigint(field: &'static str, value: u64) -> Result<i64, DbError> {
    i64::try_from(value).map_err(|_| DbError::InvalidValue {
        field,
        message: format!("{value} does not fit a signed 64-bit column"),
    })
}

fn decode_error(column: &str, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> sqlx::Error {
    sqlx::Error::ColumnDecode {
        index: column.to_owned(),
        source: source.into(),
    }
}

/// Typed access to the columns of an [`AnyRow`], for the conversions the
/// `Any` driver does not make itself (UUIDs, enums, booleans, JSON).
pub(crate) trait RowExt {
    fn text(&self, column: &str) -> Result<String, sqlx::Error>;
    fn opt_text(&self, column: &str) -> Result<Option<String>, sqlx::Error>;
    fn int(&self, column: &str) -> Result<i64, sqlx::Error>;

    fn uuid(&self, column: &str) -> Result<Uuid, sqlx::Error> {
        let text = self.text(column)?;
        Uuid::parse_str(&text).map_err(|e| decode_error(column, e))
    }

    fn opt_uuid(&self, column: &str) -> Result<Option<Uuid>, sqlx::Error> {
        self.opt_text(column)?
            .map(|text| Uuid::parse_str(&text).map_err(|e| decode_error(column, e)))
            .transpose()
    }

    fn unsigned<T: TryFrom<i64>>(&self, column: &str) -> Result<T, sqlx::Error> {
        let value = self.int(column)?;
        T::try_from(value).map_err(|_| decode_error(column, format!("{value} is out of range")))
    }

    /// Booleans are selected as `CASE WHEN b THEN 1 ELSE 0 END`: the Any
    /// driver refuses SQLite columns declared BOOLEAN.
    fn flag(&self, column: &str) -> Result<bool, sqlx::Error> {
        Ok(self.int(column)? != 0)
    }

    fn parsed<T: FromStr<Err = UnknownValue>>(&self, column: &str) -> Result<T, sqlx::Error> {
        self.text(column)?.parse().map_err(|e| decode_error(column, e))
    }

    fn opt_json(&self, column: &str) -> Result<Option<serde_json::Value>, sqlx::Error> {
        self.opt_text(column)?
            .map(|text| serde_json::from_str(&text).map_err(|e| decode_error(column, e)))
            .transpose()
    }
}

impl RowExt for AnyRow {
    fn text(&self, column: &str) -> Result<String, sqlx::Error> {
        self.try_get(column)
    }

    fn opt_text(&self, column: &str) -> Result<Option<String>, sqlx::Error> {
        self.try_get(column)
    }

    fn int(&self, column: &str) -> Result<i64, sqlx::Error> {
        self.try_get(column)
    }
}

/// A stored enum value this version does not know.
#[derive(Debug, thiserror::Error)]
#[error("unknown {kind} {value:?}")]
pub struct UnknownValue {
    kind: &'static str,
    value: String,
}

/// An enum stored as TEXT, spelled as the schema's CHECK constraint spells it.
macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident, $kind:literal { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = $crate::db::UnknownValue;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err($crate::db::UnknownValue { kind: $kind, value: s.to_owned() }),
                }
            }
        }
    };
}
pub(crate) use text_enum;
