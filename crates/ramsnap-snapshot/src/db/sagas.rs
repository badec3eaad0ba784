//! The saga log, as omicron keeps it for steno: a row per saga and an
//! append-only table of node events keyed by (saga, node, event type), so that
//! recording an event twice (a replayed step) leaves one row.

use super::{now_ms, Database, DbError, OperationState, RowExt, VolumeRef};
use sqlx::any::AnyRow;
use sqlx::AnyConnection;
use uuid::Uuid;

super::text_enum! {
    SagaState, "saga state" {
        Running => "RUNNING",
        /// A node failed and the undo actions are running.
        Unwinding => "UNWINDING",
        Done => "DONE",
        /// Given up on; recovery no longer resumes it.
        Abandoned => "ABANDONED",
    }
}

super::text_enum! {
    SagaNodeEventType, "saga node event type" {
        Started => "started",
        Succeeded => "succeeded",
        Failed => "failed",
        UndoStarted => "undo_started",
        UndoFinished => "undo_finished",
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Saga {
    pub id: Uuid,
    /// The saga template's name, e.g. `snapshot_create`.
    pub name: String,
    pub params: serde_json::Value,
    pub state: SagaState,
    /// The coordinator instance executing the saga.
    pub owner: String,
    pub operation_id: Option<Uuid>,
    /// Why the saga is not executed, if it is parked (its log does not fit
    /// its definition in this release).
    pub parked: Option<String>,
    /// Bumped each time a coordinator adopts the saga from another; every
    /// write to its log names the generation it was read at and is refused
    /// once the saga has moved on ([`DbError::StaleOwner`]).
    pub generation: i64,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds.
    pub updated_at: i64,
}

/// A saga to record; it begins RUNNING.
#[derive(Debug, Clone)]
pub struct NewSaga {
    pub id: Uuid,
    pub name: String,
    pub params: serde_json::Value,
    pub owner: String,
    pub operation_id: Option<Uuid>,
}

/// An event to append to a saga's log.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingEvent {
    pub node_id: u32,
    /// The node's name in the saga's definition.
    pub node_name: &'static str,
    pub event_type: SagaNodeEventType,
    pub data: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SagaNodeEvent {
    pub saga_id: Uuid,
    pub node_id: u32,
    /// None for events logged before the log named nodes.
    pub node_name: Option<String>,
    pub event_type: SagaNodeEventType,
    /// A succeeded node's output, or a failed node's error.
    pub data: Option<serde_json::Value>,
    /// Unix milliseconds; set when the event is recorded.
    pub created_at: i64,
}

pub(super) const SAGA_COLUMNS: &str =
    "id, name, params, state, owner, operation_id, parked, generation, created_at, updated_at";

pub(super) fn saga_from_row(row: &AnyRow) -> Result<Saga, sqlx::Error> {
    Ok(Saga {
        id: row.uuid("id")?,
        name: row.text("name")?,
        params: row.opt_json("params")?.unwrap_or_default(),
        state: row.parsed("state")?,
        owner: row.text("owner")?,
        operation_id: row.opt_uuid("operation_id")?,
        parked: row.opt_text("parked")?,
        generation: row.int("generation")?,
        created_at: row.int("created_at")?,
        updated_at: row.int("updated_at")?,
    })
}

fn event_from_row(row: &AnyRow) -> Result<SagaNodeEvent, sqlx::Error> {
    Ok(SagaNodeEvent {
        saga_id: row.uuid("saga_id")?,
        node_id: row.unsigned("node_id")?,
        node_name: row.opt_text("node_name")?,
        event_type: row.parsed("event_type")?,
        data: row.opt_json("data")?,
        created_at: row.int("created_at")?,
    })
}

impl Database {
    pub async fn create_saga(&self, new: &NewSaga) -> Result<Saga, DbError> {
        let mut conn = self.writer().acquire().await?;
        insert_saga(&mut conn, new, now_ms()).await
    }

    pub async fn get_saga(&self, id: Uuid) -> Result<Saga, DbError> {
        let row = sqlx::query(sql!("SELECT {SAGA_COLUMNS} FROM sagas WHERE id = $1"))
            .bind(id.to_string())
            .fetch_optional(self.pool())
            .await?
            .ok_or_else(|| DbError::not_found("saga", id))?;
        Ok(saga_from_row(&row)?)
    }

    /// Sets the state of a saga owned at `generation`.
    pub async fn set_saga_state(&self, id: Uuid, generation: i64, state: SagaState) -> Result<(), DbError> {
        self.update_owned_saga(id, generation, "state", Some(state.as_str()))
            .await
    }

    /// Sets one text column of a saga owned at `generation`; a saga that
    /// moved on is [`DbError::StaleOwner`].
    async fn update_owned_saga(
        &self,
        id: Uuid,
        generation: i64,
        column: &'static str,
        value: Option<&str>,
    ) -> Result<(), DbError> {
        let mut conn = self.writer().acquire().await?;
        let result = sqlx::query(sql!(
            "UPDATE sagas SET {column} = $2, updated_at = $3 WHERE id = $1 AND generation = $4"
        ))
        .bind(id.to_string())
        .bind(value)
        .bind(now_ms())
        .bind(generation)
        .execute(&mut *conn)
        .await?;
        if result.rows_affected() == 0 {
            return Err(stale_or_missing(&mut conn, id, generation).await);
        }
        Ok(())
    }

    /// Ends a saga (owned at a generation) in ONE transaction: records `events` (its last node's
    /// success, and any other the executor has not logged yet), ends its operation
    /// (see [`Database::finish_operation`]) and marks the saga DONE. Returns
    /// the operation as it ended (None when it had ended so before: a replay).
    pub async fn finish_saga(
        &self,
        (saga_id, generation): (Uuid, i64),
        events: &[PendingEvent],
        operation_id: Uuid,
        state: OperationState,
        error: Option<&str>,
        result: Option<&serde_json::Value>,
    ) -> Result<Option<super::Operation>, DbError> {
        retry_transient!(async {
            let now = now_ms();
            let mut tx = self.begin_write().await?;
            // The saga's row first: its lock keeps an adoption out until
            // this commits, and a saga adopted already ends nothing here.
            let done =
                sqlx::query("UPDATE sagas SET state = $2, updated_at = $3 WHERE id = $1 AND generation = $4")
                    .bind(saga_id.to_string())
                    .bind(SagaState::Done.as_str())
                    .bind(now)
                    .bind(generation)
                    .execute(&mut *tx)
                    .await?;
            if done.rows_affected() == 0 {
                return Err(stale_or_missing(&mut tx, saga_id, generation).await);
            }
            insert_events(&mut tx, saga_id, None, events, now).await?;
            let ended =
                super::operations::end_operation(&mut tx, operation_id, state, error, result, now).await?;
            tx.commit().await?;
            Ok(ended)
        })
    }

    /// Sagas still RUNNING or UNWINDING, oldest first: what recovery resumes.
    pub async fn list_unfinished_sagas(&self) -> Result<Vec<Saga>, DbError> {
        let rows = sqlx::query(sql!(
            "SELECT {SAGA_COLUMNS} FROM sagas WHERE state IN ('RUNNING', 'UNWINDING') \
             ORDER BY created_at, id"
        ))
        .fetch_all(self.pool())
        .await?;
        Ok(rows.iter().map(saga_from_row).collect::<Result<_, _>>()?)
    }

    /// Records a node event. Recording the same (saga, node, event type) again
    /// changes nothing and returns false; the first record wins.
    pub async fn append_saga_node_event(
        &self,
        saga_id: Uuid,
        generation: i64,
        node: (u32, &str),
        event_type: SagaNodeEventType,
        data: Option<&serde_json::Value>,
    ) -> Result<bool, DbError> {
        let mut conn = self.writer().acquire().await?;
        let row = EventRow {
            node_id: node.0,
            node_name: node.1,
            event_type,
            data,
        };
        Ok(insert_rows(&mut conn, saga_id, Some(generation), &[row], now_ms()).await? == 1)
    }

    /// Records why the saga (owned at `generation`) is not executed; None:
    /// it runs again.
    pub async fn set_saga_parked(
        &self,
        id: Uuid,
        generation: i64,
        reason: Option<&str>,
    ) -> Result<(), DbError> {
        self.update_owned_saga(id, generation, "parked", reason).await
    }

    /// Appends events in one commit (the saga log's one write between two
    /// nodes: a node's success and the next node's start, with the events of
    /// local nodes run in between). Nothing to append is no commit.
    ///
    /// On SQLite, whose writes are serialized, appends from concurrent sagas
    /// are committed together (group commit): one task writes them, each
    /// batch in one transaction, so that with many sagas the log costs one
    /// commit (one fsync) per batch rather than per append (scale bench,
    /// disk-only: 146.5 -> 167.2 sagas/s). PostgreSQL flushes concurrent
    /// commits together already: batching there measured the same (152 and
    /// 147 sagas/s direct, 158 and 150 batched), so it writes directly. The
    /// call returns once its events are committed.
    pub async fn append_saga_node_events(
        &self,
        saga_id: Uuid,
        generation: i64,
        events: &[PendingEvent],
    ) -> Result<(), DbError> {
        if events.is_empty() {
            return Ok(());
        }
        if self.backend == super::Backend::Postgres {
            let mut conn = self.writer().acquire().await?;
            return insert_events(&mut conn, saga_id, Some(generation), events, now_ms()).await;
        }
        let (done, answer) = tokio::sync::oneshot::channel();
        let job = AppendJob {
            saga_id,
            generation,
            events: events.to_vec(),
            done,
        };
        if self.appender.send(job).is_err() {
            // The log writer is gone (the database is closing): write here.
            let mut conn = self.writer().acquire().await?;
            return insert_events(&mut conn, saga_id, Some(generation), events, now_ms()).await;
        }
        answer.await.unwrap_or_else(|_| {
            Err(DbError::InvalidValue {
                field: "saga log",
                message: "the log writer stopped before answering".into(),
            })
        })
    }

    /// The saga's node events in the order they happened: by time, and
    /// within a node in the order of its life cycle.
    pub async fn saga_node_events(&self, saga_id: Uuid) -> Result<Vec<SagaNodeEvent>, DbError> {
        let rows = sqlx::query(
            "SELECT saga_id, node_id, node_name, event_type, data, created_at FROM saga_node_events \
             WHERE saga_id = $1 \
             ORDER BY created_at, node_id, CASE event_type WHEN 'started' THEN 0 WHEN 'succeeded' THEN 1 \
             WHEN 'failed' THEN 1 WHEN 'undo_started' THEN 2 ELSE 3 END",
        )
        .bind(saga_id.to_string())
        .fetch_all(self.pool())
        .await?;
        Ok(rows.iter().map(event_from_row).collect::<Result<_, _>>()?)
    }

    /// Records that the saga is about to create volume `v` (before it asks
    /// the storage), so that its undo knows the volume is its own. Claiming
    /// again is a no-op.
    pub async fn claim_saga_volume(&self, saga_id: Uuid, v: &VolumeRef) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO saga_volumes (saga_id, domain_id, image_id, volume_id, created_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        )
        .bind(saga_id.to_string())
        .bind(v.domain_id.to_string())
        .bind(v.image_id.to_string())
        .bind(v.volume_id.to_string())
        .bind(now_ms())
        .execute(self.writer())
        .await
        .map_err(DbError::on_write("saga", saga_id))?;
        Ok(())
    }

    /// Forgets a claim: the storage refused to create the volume because
    /// another one had its id (the volume is not the saga's).
    pub async fn release_saga_volume(&self, saga_id: Uuid, v: &VolumeRef) -> Result<(), DbError> {
        sqlx::query(
            "DELETE FROM saga_volumes \
             WHERE saga_id = $1 AND domain_id = $2 AND image_id = $3 AND volume_id = $4",
        )
        .bind(saga_id.to_string())
        .bind(v.domain_id.to_string())
        .bind(v.image_id.to_string())
        .bind(v.volume_id.to_string())
        .execute(self.writer())
        .await?;
        Ok(())
    }

    /// The volumes the saga claimed (see [`Database::claim_saga_volume`]).
    pub async fn saga_volumes(&self, saga_id: Uuid) -> Result<Vec<VolumeRef>, DbError> {
        let rows = sqlx::query(
            "SELECT domain_id, image_id, volume_id FROM saga_volumes WHERE saga_id = $1 \
             ORDER BY created_at, domain_id, image_id, volume_id",
        )
        .bind(saga_id.to_string())
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(VolumeRef {
                    domain_id: r.uuid("domain_id")?,
                    image_id: r.uuid("image_id")?,
                    volume_id: r.uuid("volume_id")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(DbError::from)
    }
}

/// Records `new` as a RUNNING saga.
pub(super) async fn insert_saga(conn: &mut AnyConnection, new: &NewSaga, now: i64) -> Result<Saga, DbError> {
    let saga = Saga {
        id: new.id,
        name: new.name.clone(),
        params: new.params.clone(),
        state: SagaState::Running,
        owner: new.owner.clone(),
        operation_id: new.operation_id,
        parked: None,
        generation: 0,
        created_at: now,
        updated_at: now,
    };
    sqlx::query(
        "INSERT INTO sagas (id, name, params, state, owner, operation_id, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
    )
    .bind(saga.id.to_string())
    .bind(&saga.name)
    .bind(saga.params.to_string())
    .bind(saga.state.as_str())
    .bind(&saga.owner)
    .bind(saga.operation_id.map(|id| id.to_string()))
    .bind(now)
    .execute(&mut *conn)
    .await
    .map_err(DbError::on_write("saga", saga.id))?;
    Ok(saga)
}

/// Records a node event; the same (saga, node, event type) again changes
/// nothing and returns false.
pub(super) async fn insert_event(
    conn: &mut AnyConnection,
    saga_id: Uuid,
    (node_id, node_name): (u32, &str),
    event_type: SagaNodeEventType,
    data: Option<&serde_json::Value>,
    now: i64,
) -> Result<bool, DbError> {
    let row = EventRow {
        node_id,
        node_name,
        event_type,
        data,
    };
    Ok(insert_rows(conn, saga_id, None, &[row], now).await? == 1)
}

/// A row of the saga log as it is inserted.
struct EventRow<'a> {
    node_id: u32,
    node_name: &'a str,
    event_type: SagaNodeEventType,
    data: Option<&'a serde_json::Value>,
}

impl<'a> From<&'a PendingEvent> for EventRow<'a> {
    fn from(e: &'a PendingEvent) -> Self {
        EventRow {
            node_id: e.node_id,
            node_name: e.node_name,
            event_type: e.event_type,
            data: e.data.as_ref(),
        }
    }
}

/// Records events in one statement; with a generation, only while the
/// saga is still at it (see [`insert_rows`]).
async fn insert_events(
    conn: &mut AnyConnection,
    saga_id: Uuid,
    generation: Option<i64>,
    events: &[PendingEvent],
    now: i64,
) -> Result<(), DbError> {
    let rows: Vec<EventRow> = events.iter().map(EventRow::from).collect();
    insert_rows(conn, saga_id, generation, &rows, now).await?;
    Ok(())
}

/// Inserts `events` into the saga's log in one statement and returns how many were new: an event already recorded is
/// left as it is. With a generation, the insert is conditional on the
/// saga still being at that generation, checked under a share lock of its
/// row on PostgreSQL (an adoption waits for this insert's transaction, or
/// this insert sees the adoption), and a saga that has moved on is
/// [`DbError::StaleOwner`].
async fn insert_rows(
    conn: &mut AnyConnection,
    saga_id: Uuid,
    generation: Option<i64>,
    events: &[EventRow<'_>],
    now: i64,
) -> Result<u64, DbError> {
    if events.is_empty() {
        return Ok(0);
    }
    let values: Vec<String> = (0..events.len())
        .map(|i| {
            let p = 4 * i + 3;
            format!("($1, ${}, ${}, ${}, ${}, $2)", p, p + 1, p + 2, p + 3)
        })
        .collect();
    let fence_param = 4 * events.len() + 3;
    let share = if conn.backend_name() == "PostgreSQL" {
        " FOR SHARE"
    } else {
        ""
    };
    let text = match generation {
        None => sql!(
            "INSERT INTO saga_node_events (saga_id, node_id, node_name, event_type, data, created_at) VALUES {} \
             ON CONFLICT DO NOTHING",
            values.join(", ")
        ),
        Some(_) => sql!(
            "INSERT INTO saga_node_events (saga_id, node_id, node_name, event_type, data, created_at) \
             SELECT * FROM (VALUES {}) AS v \
             WHERE EXISTS (SELECT 1 FROM sagas WHERE id = $1 AND generation = ${fence_param}{share}) \
             ON CONFLICT DO NOTHING",
            values.join(", ")
        ),
    };
    let mut q = sqlx::query(text).bind(saga_id.to_string()).bind(now);
    for e in events {
        q = q
            .bind(i64::from(e.node_id))
            .bind(e.node_name)
            .bind(e.event_type.as_str())
            .bind(e.data.map(|d| d.to_string()));
    }
    if let Some(g) = generation {
        q = q.bind(g);
    }
    let inserted = q
        .execute(&mut *conn)
        .await
        .map_err(DbError::on_write("saga", saga_id))?
        .rows_affected();
    if let Some(g) = generation {
        if inserted < events.len() as u64 {
            // Replayed events, or a saga that moved on (or is gone).
            match saga_generation(conn, saga_id).await? {
                Some(at) if at == g => {}
                Some(_) => {
                    return Err(DbError::StaleOwner {
                        saga: saga_id,
                        generation: g,
                    })
                }
                None => {
                    return Err(DbError::ForeignKey {
                        kind: "saga",
                        id: saga_id.to_string(),
                        message: "no such saga".into(),
                    })
                }
            }
        }
    }
    Ok(inserted)
}

async fn saga_generation(conn: &mut AnyConnection, saga_id: Uuid) -> Result<Option<i64>, DbError> {
    let row = sqlx::query("SELECT generation FROM sagas WHERE id = $1")
        .bind(saga_id.to_string())
        .fetch_optional(&mut *conn)
        .await?;
    Ok(match row {
        Some(r) => Some(r.int("generation")?),
        None => None,
    })
}

/// The saga a write is made for and its owner's generation: the write is
/// refused once another replica has adopted the saga.
pub type SagaOwner = (Uuid, i64);

/// The condition that makes a write conditional on `owner` (nothing
/// without one), its saga id and generation bound as `$first` and
/// `$first + 1` (see [`bind_owner`]).
pub(super) fn owned_by(first: usize, owner: Option<SagaOwner>) -> String {
    match owner {
        Some(_) => format!(
            "AND EXISTS (SELECT 1 FROM sagas WHERE id = ${first} AND generation = ${})",
            first + 1
        ),
        None => String::new(),
    }
}

/// Binds what [`owned_by`] refers to.
pub(super) fn bind_owner<'q>(
    query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
    owner: Option<SagaOwner>,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
    match owner {
        Some((saga, generation)) => query.bind(saga.to_string()).bind(generation),
        None => query,
    }
}

/// After a conditional write changed nothing: [`DbError::StaleOwner`] if
/// the saga is not owned at that generation (any more), else Ok.
pub(super) async fn check_owner(
    conn: &mut AnyConnection,
    (saga, generation): SagaOwner,
) -> Result<(), DbError> {
    match saga_generation(conn, saga).await? {
        Some(g) if g == generation => Ok(()),
        Some(_) => Err(DbError::StaleOwner { saga, generation }),
        None => Err(DbError::not_found("saga", saga)),
    }
}

/// In a write transaction of a saga's handle: holds the saga's row (FOR
/// SHARE on PostgreSQL: an adoption waits until this transaction ends) and
/// refuses if the saga is not owned at `owner`'s generation.
pub(super) async fn hold_owner(
    conn: &mut AnyConnection,
    backend: super::Backend,
    owner: SagaOwner,
) -> Result<(), DbError> {
    let lock = match backend {
        super::Backend::Postgres => " FOR SHARE",
        super::Backend::Sqlite => "",
    };
    let row = sqlx::query(sql!("SELECT generation FROM sagas WHERE id = $1{lock}"))
        .bind(owner.0.to_string())
        .fetch_optional(&mut *conn)
        .await?;
    let generation = match row {
        Some(r) => Some(r.int("generation")?),
        None => None,
    };
    match generation {
        Some(g) if g == owner.1 => Ok(()),
        Some(_) => Err(DbError::StaleOwner {
            saga: owner.0,
            generation: owner.1,
        }),
        None => Err(DbError::not_found("saga", owner.0)),
    }
}

/// Why a write conditional on (saga, generation) changed nothing.
async fn stale_or_missing(conn: &mut AnyConnection, saga_id: Uuid, generation: i64) -> DbError {
    match saga_generation(conn, saga_id).await {
        Ok(Some(_)) => DbError::StaleOwner {
            saga: saga_id,
            generation,
        },
        Ok(None) => DbError::not_found("saga", saga_id),
        Err(e) => e,
    }
}

/// One saga's events for the log writer, and where to say they are committed.
pub(super) struct AppendJob {
    saga_id: Uuid,
    generation: i64,
    events: Vec<PendingEvent>,
    done: tokio::sync::oneshot::Sender<Result<(), DbError>>,
}

/// Most appends committed in one transaction.
const MAX_BATCH: usize = 256;

/// The log writer: takes every append waiting, commits them in one
/// transaction, answers each. A batch that fails (an append for a saga
/// that does not exist, a transient error) is written again one append per
/// transaction, so that each gets its own answer. Ends when every
/// [`Database`] handle is gone.
pub(super) async fn log_writer(db: Database, mut jobs: tokio::sync::mpsc::UnboundedReceiver<AppendJob>) {
    while let Some(first) = jobs.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if batch.len() > 1 && write_batch(&db, &batch).await.is_ok() {
            for job in batch {
                let _ = job.done.send(Ok(()));
            }
            continue;
        }
        for job in batch {
            let result = retry_transient!(async {
                let mut conn = db.writer().acquire().await?;
                insert_events(
                    &mut conn,
                    job.saga_id,
                    Some(job.generation),
                    &job.events,
                    now_ms(),
                )
                .await
            });
            let _ = job.done.send(result);
        }
    }
}

async fn write_batch(db: &Database, batch: &[AppendJob]) -> Result<(), DbError> {
    let now = now_ms();
    let mut tx = db.begin_write().await?;
    for job in batch {
        insert_events(&mut tx, job.saga_id, Some(job.generation), &job.events, now).await?;
    }
    tx.commit().await?;
    Ok(())
}
