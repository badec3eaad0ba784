//! Long-running operations: their progress and outcome, and the client
//! request ids that make starting one idempotent.

use super::sagas::{bind_owner, check_owner, owned_by};
use super::{decode_error, now_ms, to_bigint, Database, DbError, NewSaga, RowExt, Saga, SagaNodeEventType};
use sqlx::any::AnyRow;
use sqlx::AnyConnection;
use uuid::Uuid;

super::text_enum! {
    OperationState, "operation state" {
        Running => "RUNNING",
        Succeeded => "SUCCEEDED",
        Failed => "FAILED",
        Cancelled => "CANCELLED",
    }
}

impl OperationState {
    pub fn is_terminal(self) -> bool {
        self != OperationState::Running
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Operation {
    pub id: Uuid,
    /// What the operation does, e.g. `snapshot_create`.
    pub kind: String,
    pub vm_id: Option<Uuid>,
    /// The client's request id; the same id never starts a second operation.
    pub request_id: Option<String>,
    pub state: OperationState,
    pub progress_processed: u64,
    pub progress_total: u64,
    pub error: Option<String>,
    pub result: Option<serde_json::Value>,
    /// A client asked the operation to stop; its saga unwinds at the next node.
    pub cancel_requested: bool,
    /// Warnings for the client (e.g. "memory discarded"), oldest first.
    pub warnings: Vec<String>,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds.
    pub updated_at: i64,
    /// What the request that started it asked for (see
    /// [`Database::create_operation_for_request`]); None for operations
    /// started without one, or before fingerprints were recorded.
    pub request_fingerprint: Option<String>,
}

/// An operation to start; it begins RUNNING with no progress.
#[derive(Debug, Clone)]
pub struct NewOperation {
    pub id: Uuid,
    pub kind: String,
    pub vm_id: Option<Uuid>,
    pub request_id: Option<String>,
    /// Warnings known when the operation starts.
    pub warnings: Vec<String>,
}

const COLUMNS: &str = "id, kind, vm_id, request_id, state, progress_processed, progress_total, error, \
     result, cancel_requested, warnings, created_at, updated_at, request_fingerprint";

fn warnings_from_row(row: &AnyRow) -> Result<Vec<String>, sqlx::Error> {
    let text = row.text("warnings")?;
    serde_json::from_str(&text).map_err(|e| decode_error("warnings", e))
}

fn warnings_json(warnings: &[String]) -> String {
    serde_json::Value::from(warnings.to_vec()).to_string()
}

fn from_row(row: &AnyRow) -> Result<Operation, sqlx::Error> {
    Ok(Operation {
        id: row.uuid("id")?,
        kind: row.text("kind")?,
        vm_id: row.opt_uuid("vm_id")?,
        request_id: row.opt_text("request_id")?,
        state: row.parsed("state")?,
        progress_processed: row.unsigned("progress_processed")?,
        progress_total: row.unsigned("progress_total")?,
        error: row.opt_text("error")?,
        result: row.opt_json("result")?,
        cancel_requested: row.flag("cancel_requested")?,
        warnings: warnings_from_row(row)?,
        created_at: row.int("created_at")?,
        updated_at: row.int("updated_at")?,
        request_fingerprint: row.opt_text("request_fingerprint")?,
    })
}

impl NewOperation {
    fn into_operation(self, now: i64, fingerprint: Option<&str>) -> Operation {
        Operation {
            id: self.id,
            kind: self.kind,
            vm_id: self.vm_id,
            request_id: self.request_id,
            state: OperationState::Running,
            progress_processed: 0,
            progress_total: 0,
            error: None,
            result: None,
            cancel_requested: false,
            warnings: self.warnings,
            created_at: now,
            updated_at: now,
            request_fingerprint: fingerprint.map(str::to_owned),
        }
    }
}

const INSERT: &str = "INSERT INTO operations \
     (id, kind, vm_id, request_id, state, progress_processed, progress_total, error, result, \
     cancel_requested, warnings, created_at, updated_at, request_fingerprint) \
     VALUES ($1, $2, $3, $4, $5, 0, 0, NULL, NULL, 0, $7, $6, $6, $8)";

impl Database {
    /// Starts an operation. A reused id or request id is a [`DbError::Conflict`].
    pub async fn create_operation(&self, new: &NewOperation) -> Result<Operation, DbError> {
        self.create_operation_for_request(new, None).await
    }

    /// Starts an operation and records `fingerprint`, what the request that
    /// started it asked for, so that a reuse of its request id for another
    /// request can be told from a retry. A reused id or request id is a
    /// [`DbError::Conflict`].
    pub async fn create_operation_for_request(
        &self,
        new: &NewOperation,
        fingerprint: Option<&str>,
    ) -> Result<Operation, DbError> {
        let op = new.clone().into_operation(now_ms(), fingerprint);
        let mut conn = self.writer().acquire().await?;
        insert(&mut conn, &op).await?;
        Ok(op)
    }

    /// Starts an operation unless one was already started for the same
    /// request id, in which case that one is returned. The flag says whether
    /// this call created it. A request id reused for an operation of another
    /// kind or VM is a [`DbError::Conflict`].
    pub async fn ensure_operation(&self, new: &NewOperation) -> Result<(Operation, bool), DbError> {
        let Some(request_id) = &new.request_id else {
            return Ok((self.create_operation(new).await?, true));
        };
        let op = new.clone().into_operation(now_ms(), None);
        let result = sqlx::query(sql!("{INSERT} ON CONFLICT (request_id) DO NOTHING"))
            .bind(op.id.to_string())
            .bind(&op.kind)
            .bind(op.vm_id.map(|id| id.to_string()))
            .bind(request_id)
            .bind(op.state.as_str())
            .bind(op.created_at)
            .bind(warnings_json(&op.warnings))
            .bind(None::<String>)
            .execute(self.writer())
            .await
            .map_err(DbError::on_write("operation", op.id))?;
        if result.rows_affected() == 1 {
            return Ok((op, true));
        }
        let existing = self
            .get_operation_by_request_id(request_id)
            .await?
            .ok_or_else(|| DbError::not_found("operation with request id", request_id))?;
        if existing.kind != new.kind || existing.vm_id != new.vm_id {
            return Err(DbError::Conflict {
                kind: "request id",
                id: request_id.clone(),
                message: format!("already used by operation {} ({})", existing.id, existing.kind),
            });
        }
        Ok((existing, false))
    }

    /// Records a call that completed at once (CreateCluster, AddHost) as a
    /// SUCCEEDED operation with its `result`, so that its request id answers
    /// retries and refuses reuse like any other. A reused request id is a
    /// [`DbError::Conflict`].
    pub async fn record_completed_request(
        &self,
        new: &NewOperation,
        fingerprint: &str,
        result: &serde_json::Value,
    ) -> Result<Operation, DbError> {
        let mut op = new.clone().into_operation(now_ms(), Some(fingerprint));
        op.state = OperationState::Succeeded;
        op.result = Some(result.clone());
        sqlx::query(
            "INSERT INTO operations \
             (id, kind, vm_id, request_id, state, progress_processed, progress_total, error, result, \
             cancel_requested, warnings, created_at, updated_at, request_fingerprint) \
             VALUES ($1, $2, $3, $4, $5, 0, 0, NULL, $8, 0, $7, $6, $6, $9)",
        )
        .bind(op.id.to_string())
        .bind(&op.kind)
        .bind(op.vm_id.map(|id| id.to_string()))
        .bind(op.request_id.clone())
        .bind(op.state.as_str())
        .bind(op.created_at)
        .bind(warnings_json(&op.warnings))
        .bind(result.to_string())
        .bind(fingerprint)
        .execute(self.writer())
        .await
        .map_err(DbError::on_write("operation", op.id))?;
        Ok(op)
    }

    pub async fn get_operation(&self, id: Uuid) -> Result<Operation, DbError> {
        let row = sqlx::query(sql!("SELECT {COLUMNS} FROM operations WHERE id = $1"))
            .bind(id.to_string())
            .fetch_optional(self.pool())
            .await?
            .ok_or_else(|| DbError::not_found("operation", id))?;
        Ok(from_row(&row)?)
    }

    /// The operation started for this request id, if any.
    pub async fn get_operation_by_request_id(&self, request_id: &str) -> Result<Option<Operation>, DbError> {
        let row = sqlx::query(sql!("SELECT {COLUMNS} FROM operations WHERE request_id = $1"))
            .bind(request_id)
            .fetch_optional(self.pool())
            .await?;
        Ok(row.as_ref().map(from_row).transpose()?)
    }

    /// Operations, oldest first; only those of `vm_id` if given.
    pub async fn list_operations(&self, vm_id: Option<Uuid>) -> Result<Vec<Operation>, DbError> {
        let rows = match vm_id {
            Some(vm_id) => {
                sqlx::query(sql!(
                    "SELECT {COLUMNS} FROM operations WHERE vm_id = $1 ORDER BY created_at, id"
                ))
                .bind(vm_id.to_string())
                .fetch_all(self.pool())
                .await?
            }
            None => {
                sqlx::query(sql!("SELECT {COLUMNS} FROM operations ORDER BY created_at, id"))
                    .fetch_all(self.pool())
                    .await?
            }
        };
        Ok(rows.iter().map(from_row).collect::<Result<_, _>>()?)
    }

    /// One page of operations in (created_at, id) order: those of `vm_id`
    /// and in `state` when given, after the (created_at, id) `after`; at
    /// most `limit` (a keyset query: a page costs the same wherever it is).
    pub async fn list_operations_page(
        &self,
        vm_id: Option<Uuid>,
        state: Option<OperationState>,
        after: Option<(i64, String)>,
        limit: i64,
    ) -> Result<Vec<Operation>, DbError> {
        let mut conditions = Vec::new();
        let mut n = 0;
        let mut next = || {
            n += 1;
            n
        };
        if vm_id.is_some() {
            conditions.push(format!("vm_id = ${}", next()));
        }
        if state.is_some() {
            conditions.push(format!("state = ${}", next()));
        }
        if after.is_some() {
            let (t, t2, id) = (next(), next(), next());
            conditions.push(format!(
                "(created_at > ${t} OR (created_at = ${t2} AND id > ${id}))"
            ));
        }
        let limit_at = next();
        let filter = if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conditions.join(" AND "))
        };
        let text =
            sql!("SELECT {COLUMNS} FROM operations {filter} ORDER BY created_at, id LIMIT ${limit_at}");
        let mut query = sqlx::query(text);
        if let Some(vm) = vm_id {
            query = query.bind(vm.to_string());
        }
        if let Some(state) = state {
            query = query.bind(state.as_str());
        }
        if let Some((t, id)) = after {
            query = query.bind(t).bind(t).bind(id);
        }
        let rows = query.bind(limit).fetch_all(self.pool()).await?;
        Ok(rows.iter().map(from_row).collect::<Result<_, _>>()?)
    }

    /// Writes an operation's progress; on a saga's handle, only while the
    /// saga is owned at its generation ([`DbError::StaleOwner`] after).
    pub async fn update_operation_progress(
        &self,
        id: Uuid,
        processed: u64,
        total: u64,
    ) -> Result<(), DbError> {
        let owner = self.owner;
        let mut conn = self.writer().acquire().await?;
        let query = sqlx::query(sql!(
            "UPDATE operations SET progress_processed = $2, progress_total = $3, updated_at = $4 \
             WHERE id = $1 {}",
            owned_by(5, owner)
        ))
        .bind(id.to_string())
        .bind(to_bigint("progress_processed", processed)?)
        .bind(to_bigint("progress_total", total)?)
        .bind(now_ms());
        let result = bind_owner(query, owner).execute(&mut *conn).await?;
        if result.rows_affected() == 0 {
            if let Some(owner) = owner {
                check_owner(&mut conn, owner).await?;
            }
            return Err(DbError::not_found("operation", id));
        }
        Ok(())
    }

    /// Ends a RUNNING operation. Ending it again in the same state is a no-op
    /// (a replayed step); changing the outcome of an ended operation is a
    /// [`DbError::Conflict`].
    pub async fn finish_operation(
        &self,
        id: Uuid,
        state: OperationState,
        error: Option<&str>,
        result: Option<&serde_json::Value>,
    ) -> Result<(), DbError> {
        let mut conn = self.writer().acquire().await?;
        end_operation(&mut conn, id, state, error, result, now_ms()).await?;
        Ok(())
    }

    /// Accepts a request in ONE transaction: records the operation (with
    /// the request's fingerprint), takes `lock_vm`'s lock for it, records
    /// its saga and the start of the saga's first node, so that the saga
    /// runs at once without another commit. If another operation holds the
    /// VM, the operation is recorded FAILED with `locked_error(holder)` (its
    /// request id then answers retries as any other) and nothing else is;
    /// a reused id or request id is a [`DbError::Conflict`] and a VM that
    /// does not exist [`DbError::NotFound`], both recording nothing.
    pub async fn accept_operation(
        &self,
        new: &NewOperation,
        fingerprint: Option<&str>,
        lock_vm: Option<Uuid>,
        locked_error: &(dyn Fn(Uuid) -> String + Sync),
        saga: &NewSaga,
        first_node: &str,
    ) -> Result<Accepted, DbError> {
        retry_transient!(async {
            let now = now_ms();
            let mut op = new.clone().into_operation(now, fingerprint);
            let mut tx = self.begin_write().await?;
            insert(&mut tx, &op).await?;
            if let Some(vm_id) = lock_vm {
                if let Some(holder) = super::vms::lock(&mut tx, vm_id, op.id, None).await? {
                    let error = locked_error(holder);
                    end_operation(&mut tx, op.id, OperationState::Failed, Some(&error), None, now).await?;
                    tx.commit().await?;
                    op.state = OperationState::Failed;
                    op.error = Some(error);
                    return Ok(Accepted::VmLocked {
                        operation: op,
                        holder,
                    });
                }
            }
            let saga = super::sagas::insert_saga(&mut tx, saga, now).await?;
            super::sagas::insert_event(
                &mut tx,
                saga.id,
                (0, first_node),
                SagaNodeEventType::Started,
                None,
                now,
            )
            .await?;
            tx.commit().await?;
            Ok(Accepted::Started { operation: op, saga })
        })
    }

    /// Asks a RUNNING operation to stop: its saga checks the flag between
    /// nodes and unwinds. True if the request was recorded (asking again is
    /// fine); false if the operation has already ended.
    pub async fn request_cancel(&self, id: Uuid) -> Result<bool, DbError> {
        let result = sqlx::query(
            "UPDATE operations SET cancel_requested = 1, updated_at = $2 \
             WHERE id = $1 AND state = 'RUNNING'",
        )
        .bind(id.to_string())
        .bind(now_ms())
        .execute(self.writer())
        .await?;
        if result.rows_affected() == 0 {
            // Tell "no such operation" from "already ended".
            self.get_operation(id).await?;
            return Ok(false);
        }
        Ok(true)
    }

    /// Appends a warning for the client. A warning the operation already has
    /// is not added again (a replayed step), and false is returned.
    pub async fn add_operation_warning(&self, id: Uuid, warning: &str) -> Result<bool, DbError> {
        loop {
            let row = sqlx::query("SELECT warnings FROM operations WHERE id = $1")
                .bind(id.to_string())
                .fetch_optional(self.pool())
                .await?
                .ok_or_else(|| DbError::not_found("operation", id))?;
            let old = row.text("warnings")?;
            let mut warnings = warnings_from_row(&row)?;
            if warnings.iter().any(|w| w == warning) {
                return Ok(false);
            }
            warnings.push(warning.to_owned());
            // Compare and swap: a concurrent append makes this one retry
            // rather than be lost.
            let query = sqlx::query(
                "UPDATE operations SET warnings = $3, updated_at = $4 WHERE id = $1 AND warnings = $2",
            )
            .bind(id.to_string())
            .bind(&old)
            .bind(warnings_json(&warnings))
            .bind(now_ms());
            let result = self.execute_write(query).await?;
            if result.rows_affected() == 1 {
                return Ok(true);
            }
        }
    }
}

/// What [`Database::accept_operation`] did.
#[derive(Debug)]
pub enum Accepted {
    /// The operation is RUNNING and its saga recorded, its first node started.
    Started { operation: Operation, saga: Saga },
    /// `holder` holds the VM: the operation is recorded FAILED.
    VmLocked { operation: Operation, holder: Uuid },
}

/// Records a new operation.
async fn insert(conn: &mut AnyConnection, op: &Operation) -> Result<(), DbError> {
    sqlx::query(INSERT)
        .bind(op.id.to_string())
        .bind(&op.kind)
        .bind(op.vm_id.map(|id| id.to_string()))
        .bind(op.request_id.clone())
        .bind(op.state.as_str())
        .bind(op.created_at)
        .bind(warnings_json(&op.warnings))
        .bind(op.request_fingerprint.clone())
        .execute(&mut *conn)
        .await
        .map_err(DbError::on_write("operation", op.id))?;
    Ok(())
}

/// Ends a RUNNING operation (see [`Database::finish_operation`]).
pub(super) async fn end_operation(
    conn: &mut AnyConnection,
    id: Uuid,
    state: OperationState,
    error: Option<&str>,
    result: Option<&serde_json::Value>,
    now: i64,
) -> Result<Option<Operation>, DbError> {
    if !state.is_terminal() {
        return Err(DbError::InvalidValue {
            field: "state",
            message: "an operation can only be finished in a terminal state".into(),
        });
    }
    // The row as it now is comes back with the change: the operation's
    // watchers are given it instead of reading it again.
    let updated = sqlx::query(sql!(
        "UPDATE operations SET state = $2, error = $3, result = $4, updated_at = $5 \
         WHERE id = $1 AND state = 'RUNNING' RETURNING {COLUMNS}"
    ))
    .bind(id.to_string())
    .bind(state.as_str())
    .bind(error)
    .bind(result.map(|r| r.to_string()))
    .bind(now)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(row) = updated {
        return Ok(Some(from_row(&row)?));
    }
    let row = sqlx::query("SELECT state FROM operations WHERE id = $1")
        .bind(id.to_string())
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| DbError::not_found("operation", id))?;
    let current: OperationState = row.parsed("state")?;
    if current == state {
        return Ok(None);
    }
    Err(DbError::Conflict {
        kind: "operation",
        id: id.to_string(),
        message: format!("already {current}, cannot become {state}"),
    })
}
