//! A durable executor for linear sagas, after omicron/steno.
//!
//! A saga is a named list of nodes. Each node has a forward action and,
//! until the saga's point of no return, an undo action. Every event
//! (started, succeeded with its output, failed, undo started/finished) is
//! appended to the saga log in the database before the executor moves on,
//! so a coordinator that dies at any point resumes each unfinished saga
//! from its log: forward from the first node without a `succeeded` event
//! (re-running a node that had started: actions are idempotent "ensure"
//! operations), or, if it was unwinding, on with the undo actions.
//!
//! Why not steno itself: ramsnap's sagas are all linear, and this executor
//! keeps the whole policy in one screen: a node without an undo action is
//! past the point of no return, and its failures are retried rather than
//! unwound (the saga then always completes); a failed node's own undo runs
//! too (undo actions treat "nothing to undo" as success), which is what
//! steno's no-op "undo carrier" nodes achieve.
use crate::db::{Backend, Database, NewReplica, NewSaga, OperationState, Saga, SagaNodeEventType, SagaState};
use futures::future::BoxFuture;
use ramsnap_common::fence;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use tonic_types::StatusExt;
use tracing::Instrument;
use uuid::Uuid;

/// A node's forward action, as the executor runs it: its output in the
/// log's form. Made from a typed [`Step`] by [`Node::new`].
pub type Forward<S> =
    Arc<dyn for<'a> Fn(&'a SagaCx<S>) -> BoxFuture<'a, Result<Value, Status>> + Send + Sync>;
/// A node's forward action as a saga writes it: it returns its output's
/// own type.
pub type Step<S, T> = for<'a> fn(&'a SagaCx<S>) -> BoxFuture<'a, Result<T, Status>>;
pub type Undo<S> = for<'a> fn(&'a SagaCx<S>) -> BoxFuture<'a, Result<(), Status>>;

/// A node's output: its name (the node's, in the log) and its type,
/// declared once and shared by the node that makes it ([`Node::new`]) and
/// the nodes that read it ([`SagaCx::get`]), so that the two cannot
/// disagree on what it is. Outputs are kept in the log as JSON.
pub struct Output<T> {
    pub name: &'static str,
    _type: PhantomData<fn() -> T>,
}

impl<T> Output<T> {
    pub const fn new(name: &'static str) -> Output<T> {
        Output {
            name,
            _type: PhantomData,
        }
    }
}

impl<T> Clone for Output<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Output<T> {}

/// The key in a saga's parameters under which the W3C `traceparent` of the
/// call that started it is kept (see `service::start_operation`).
pub const TRACEPARENT: &str = "_traceparent";

pub struct Node<S> {
    /// Stable name: the log and the failpoints refer to nodes by it.
    pub name: &'static str,
    pub forward: Forward<S>,
    /// None: the node is past the point of no return.
    pub undo: Option<Undo<S>>,
    /// The node changes nothing outside the coordinator's database (and,
    /// like every node, does the same again when replayed): its start and
    /// success need not be logged before the next node runs, and go with
    /// the next commit of the log. A node that calls an agent is never
    /// local: its start must be logged before the call can arrive.
    pub local: bool,
    /// Local for some parameters only (see [`Node::local_if`]).
    pub local_if: Option<fn(&Value) -> bool>,
}

impl<S: Send + Sync + 'static> Node<S> {
    /// The node that makes `output` with `forward`: named after its output,
    /// without an undo (past the point of no return; see [`Node::undo`])
    /// and not local (see [`Node::local`]).
    pub fn new<T: Serialize + Send + 'static>(output: Output<T>, forward: Step<S, T>) -> Node<S> {
        let name = output.name;
        Node {
            name,
            forward: erase(move |cx| {
                let step = forward(cx);
                Box::pin(async move {
                    let out = step.await?;
                    serde_json::to_value(out)
                        .map_err(|e| Status::internal(format!("node {name}: output not serializable: {e}")))
                })
            }),
            undo: None,
            local: false,
            local_if: None,
        }
    }

    /// What undoes the node's forward action.
    pub fn undo(mut self, undo: Undo<S>) -> Node<S> {
        self.undo = Some(undo);
        self
    }

    /// The node changes nothing outside the database (see the field).
    pub fn local(mut self) -> Node<S> {
        self.local = true;
        self
    }

    /// Local when `when` says so of the saga's parameters: a node that
    /// calls an agent only for some requests (a snapshot's memory volumes,
    /// made only when it saves memory). `when` must say the same of the
    /// same parameters every time, as the forward action must then make no
    /// call.
    pub fn local_if(mut self, when: fn(&Value) -> bool) -> Node<S> {
        self.local_if = Some(when);
        self
    }

    /// Whether the node is local for a saga with `params`.
    fn is_local(&self, params: &Value) -> bool {
        self.local || self.local_if.is_some_and(|when| when(params))
    }
}

/// Fixes a closure's signature as a [`Forward`]'s (higher-ranked over the
/// context's lifetime).
fn erase<S, F>(f: F) -> Forward<S>
where
    F: for<'a> Fn(&'a SagaCx<S>) -> BoxFuture<'a, Result<Value, Status>> + Send + Sync + 'static,
{
    Arc::new(f)
}

pub use crate::db::PendingEvent;

/// Log events waiting for the next commit.
#[derive(Default)]
struct Pending(Vec<PendingEvent>);

impl Pending {
    fn push(&mut self, event: PendingEvent) {
        self.0.push(event);
    }

    fn take(&mut self) -> Vec<PendingEvent> {
        std::mem::take(&mut self.0)
    }
}

pub struct SagaDef<S> {
    pub name: &'static str,
    pub nodes: Vec<Node<S>>,
    /// The node whose output becomes the operation's result.
    pub result_node: Option<&'static str>,
}

/// What a node sees.
pub struct SagaCx<S> {
    pub app: Arc<S>,
    pub saga_id: Uuid,
    pub operation_id: Uuid,
    params: Value,
    outputs: Mutex<HashMap<&'static str, Value>>,
    pub cancel: CancellationToken,
    db: Database,
    /// When progress was last written, and what (see [`SagaCx::progress`]).
    progress_written: Mutex<Option<(std::time::Instant, u64, u64)>>,
    notify: Notify,
    /// See [`SagaCx::memo`].
    memos: Mutex<HashMap<&'static str, Arc<dyn std::any::Any + Send + Sync>>>,
    /// The id each node of the definition has in the log (see [`align`]).
    log_ids: Vec<u32>,
    /// The saga's generation when this execution began: every write to its
    /// log is refused once another coordinator has adopted it.
    generation: i64,
}

/// Progress is written at most this often, but always when it reaches the
/// total: each write is a database commit (an fsync on SQLite), and a copy
/// or a dump reports progress as fast as it is read.
pub const PROGRESS_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

impl<S> SagaCx<S> {
    /// What this execution's agent calls carry (see [`fence`]).
    fn fence(&self) -> fence::Fence {
        fence::Fence {
            saga: self.saga_id,
            generation: self.generation,
        }
    }

    pub fn params<T: DeserializeOwned>(&self) -> Result<T, Status> {
        serde_json::from_value(self.params.clone())
            .map_err(|e| Status::internal(format!("saga {} has unreadable params: {e}", self.saga_id)))
    }

    /// An earlier node's output.
    pub fn get<T: DeserializeOwned>(&self, output: Output<T>) -> Result<T, Status> {
        self.output(output.name)
    }

    /// An earlier node's output, if that node ran (for undo actions).
    pub fn get_if_ran<T: DeserializeOwned>(&self, output: Output<T>) -> Option<T> {
        self.output(output.name).ok()
    }

    /// The output of an earlier node, by name: [`SagaCx::get`] for sagas
    /// whose nodes are not known when they are written (tests).
    pub fn output<T: DeserializeOwned>(&self, node: &str) -> Result<T, Status> {
        let v = self.outputs.lock().expect("poisoned").get(node).cloned();
        let v =
            v.ok_or_else(|| Status::internal(format!("saga {}: node {node} has no output", self.saga_id)))?;
        serde_json::from_value(v).map_err(|e| Status::internal(format!("node {node} output unreadable: {e}")))
    }

    /// A stable id derived from this saga: the same on every replay, so
    /// that a re-executed step asks for the same thing again.
    pub fn stable_id(&self, purpose: &str) -> Uuid {
        Uuid::new_v5(&self.saga_id, purpose.as_bytes())
    }

    /// Reports the operation's progress (best effort; at most every
    /// [`PROGRESS_INTERVAL`], and when it reaches the total). A report
    /// without a total, or of what was last written, writes nothing.
    pub async fn progress(&self, processed: u64, total: u64) {
        {
            let mut last = self.progress_written.lock().expect("poisoned");
            let now = std::time::Instant::now();
            let same = last.is_some_and(|(_, p, t)| (p, t) == (processed, total));
            let soon = last.is_some_and(|(at, _, _)| now.duration_since(at) < PROGRESS_INTERVAL);
            if total == 0 || same || (processed < total && soon) {
                return;
            }
            *last = Some((now, processed, total));
        }
        if self
            .db
            .update_operation_progress(self.operation_id, processed, total)
            .await
            .is_ok()
        {
            self.operation_changed();
        }
    }

    /// `read`'s answer, read once per execution of the saga: for what
    /// several nodes read and nothing changes while the saga holds its
    /// locks (the VM's row and its host). A saga resumed after a restart
    /// reads again.
    pub async fn memo<T, F, Fut>(&self, key: &'static str, read: F) -> Result<T, Status>
    where
        T: Clone + Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let known = self.memos.lock().expect("poisoned").get(key).cloned();
        if let Some(v) = known.and_then(|v| v.downcast::<T>().ok()) {
            return Ok((*v).clone());
        }
        let v = read().await?;
        self.memos
            .lock()
            .expect("poisoned")
            .insert(key, Arc::new(v.clone()));
        Ok(v)
    }

    /// Keeps `value` as [`SagaCx::memo`]'s answer for `key`: for a node
    /// that read it anyway on its way (the lock node reads the VM).
    pub fn remember<T: Send + Sync + 'static>(&self, key: &'static str, value: T) {
        self.memos.lock().expect("poisoned").insert(key, Arc::new(value));
    }

    /// Tells the operation's watchers that it changed (its progress or its
    /// warnings; the executor tells them of its end).
    pub fn operation_changed(&self) {
        (self.notify)(self.operation_id, None);
    }

    /// The database as this execution's nodes write to it: every write is
    /// refused (StaleOwner) once another replica has adopted the saga (see
    /// [`Database::for_saga`]).
    pub fn db(&self) -> &Database {
        &self.db
    }
}

/// Faults to inject, from `RAMSNAP_FAILPOINTS="saga.node=action,..."`:
/// `error` (the forward action fails once), `crash` (the process exits after
/// logging the node's start), `crash_after` (exits after the forward action
/// ran, before its success is logged), `undo_error` (the undo fails once).
/// `halt` and `halt_after` stop executing the saga at those same points
/// without ending the process: an in-process crash, for tests that then
/// resume the saga with a new executor. `hold` waits before the node's
/// forward action until the file `<RAMSNAP_FAILPOINT_DIR>/<saga>.<node>`
/// exists: a test can stop the agents while the saga stands at that node.
#[derive(Default)]
pub struct Failpoints {
    points: Mutex<HashMap<String, String>>,
}

impl Failpoints {
    pub fn from_env() -> Failpoints {
        let spec = std::env::var("RAMSNAP_FAILPOINTS").unwrap_or_default();
        Failpoints::parse(&spec)
    }

    pub fn parse(spec: &str) -> Failpoints {
        let points = spec
            .split(',')
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        Failpoints {
            points: Mutex::new(points),
        }
    }

    fn hit(&self, saga: &str, node: &str, action: &str) -> bool {
        let key = format!("{saga}.{node}");
        let mut points = self.points.lock().expect("poisoned");
        match points.get(&key) {
            Some(a) if a == action => {
                // Errors and halts fire once, so that retries and recovery
                // can finish.
                if action.ends_with("error") || action.starts_with("halt") || action == "hold" {
                    points.remove(&key);
                }
                true
            }
            _ => false,
        }
    }

    /// `hold`: logs, then waits for the release file (see above).
    async fn hold(&self, saga: &str, node: &str) {
        if !self.hit(saga, node, "hold") {
            return;
        }
        let dir = std::env::var("RAMSNAP_FAILPOINT_DIR").unwrap_or_else(|_| ".".into());
        let release = std::path::Path::new(&dir).join(format!("{saga}.{node}"));
        eprintln!("failpoint {saga}.{node}=hold: waiting for {}", release.display());
        while !release.exists() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("failpoint {saga}.{node}=hold: released");
    }

    fn crash(&self, saga: &str, node: &str, action: &str) {
        if self.hit(saga, node, action) {
            eprintln!("failpoint {saga}.{node}={action}: exiting");
            std::process::exit(86);
        }
    }
}

/// Runs sagas and resumes them after a restart.
pub struct Executor<S> {
    db: Database,
    app: Arc<S>,
    sagas: HashMap<&'static str, Arc<SagaDef<S>>>,
    /// This coordinator replica: a new id per process.
    replica: NewReplica,
    /// What it records as the owner of its sagas: its replica id.
    owner: String,
    /// Its lease on PostgreSQL, in milliseconds (see [`Executor::recover`]).
    lease_ms: AtomicU64,
    heartbeat: AtomicBool,
    failpoints: Failpoints,
    running: Mutex<HashMap<Uuid, CancellationToken>>,
    /// Cancelled when this replica finds its lease ran out: every execution
    /// it had stops where it is, as in a crash (the replicas that adopted
    /// the sagas, or this one once registered again, resume them from the
    /// log). Replaced by a fresh token at once.
    lease_lost: Mutex<CancellationToken>,
    /// Until when, by this process's clock, the lease is surely held: the
    /// time a registration or renewal was sent plus the lease (None before
    /// the first, and after a renewal found the lease ran out). On SQLite,
    /// set for good once the sagas are recovered.
    lease_held_until: Mutex<Option<Instant>>,
    /// Called whenever an operation changes (for watchers).
    notify: Notify,
    retry_cap: Duration,
}

/// Tells an operation's watchers that it changed: its id, and the
/// operation as it now is when the change ended it (they need not read it
/// then).
pub type Notify = Arc<dyn Fn(Uuid, Option<crate::db::Operation>) + Send + Sync>;

enum Outcome {
    /// With the events not logged yet (the last node's success at least).
    Done {
        pending: Vec<PendingEvent>,
    },
    Unwound {
        status: Status,
        cancelled: bool,
    },
}

impl<S: Send + Sync + 'static> Executor<S> {
    pub fn new(
        db: Database,
        app: Arc<S>,
        defs: Vec<SagaDef<S>>,
        failpoints: Failpoints,
        notify: Notify,
    ) -> Arc<Executor<S>> {
        let replica = NewReplica {
            id: Uuid::new_v4(),
            name: format!("{}:{}", hostname(), std::process::id()),
            local_key: local_key(),
            pid: i64::from(std::process::id()),
        };
        Arc::new(Executor {
            db,
            app,
            sagas: defs.into_iter().map(|d| (d.name, Arc::new(d))).collect(),
            owner: replica.id.to_string(),
            replica,
            lease_ms: AtomicU64::new(DEFAULT_LEASE.as_millis() as u64),
            heartbeat: AtomicBool::new(false),
            failpoints,
            running: Mutex::new(HashMap::new()),
            lease_lost: Mutex::new(CancellationToken::new()),
            lease_held_until: Mutex::new(None),
            notify,
            retry_cap: Duration::from_secs(5),
        })
    }

    /// Records a new saga for `operation_id` and runs it in the background.
    pub async fn start(
        self: &Arc<Self>,
        name: &'static str,
        params: Value,
        operation_id: Uuid,
    ) -> Result<Uuid, Status> {
        if !self.sagas.contains_key(name) {
            return Err(Status::internal(format!("no saga named {name}")));
        }
        let id = Uuid::new_v4();
        let saga = self
            .db
            .create_saga(&NewSaga {
                id,
                name: name.into(),
                params,
                owner: self.owner.clone(),
                operation_id: Some(operation_id),
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        // Running here (a cancel reaches it) from now on.
        let Some(running) = self.register(operation_id) else {
            return Ok(id);
        };
        let this = self.clone();
        self.in_background(
            id,
            async move { this.drive(saga, Vec::new(), running, None).await },
        );
        Ok(id)
    }

    /// This replica's id (the owner it records on its sagas).
    pub fn replica_id(&self) -> Uuid {
        self.replica.id
    }

    /// The lease this replica holds on PostgreSQL (renewed every third of
    /// it). Set before [`Executor::recover`].
    pub fn set_lease(&self, lease: Duration) {
        self.lease_ms
            .store(lease.as_millis().max(1) as u64, Ordering::Relaxed);
    }

    fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms.load(Ordering::Relaxed))
    }

    /// Takes over the sagas left unfinished by coordinators that are gone,
    /// and runs them; returns how many.
    ///
    /// On PostgreSQL, where several replicas may share the database, this
    /// replica registers with a lease and adopts only the sagas whose owner
    /// holds no live lease (a predecessor on this host whose process is
    /// gone gives its lease up at once); a heartbeat then renews the lease
    /// and adopts, each third of a lease, the sagas of replicas whose lease
    /// ran out. On SQLite, which one coordinator uses at a time (see
    /// `Options::sole_sqlite_user`), it adopts every unfinished saga at once.
    /// Adopting bumps a saga's generation: the previous owner's writes to
    /// its log are refused from then on.
    pub async fn recover(self: &Arc<Self>) -> Result<usize, Status> {
        let db_err = |e: crate::db::DbError| Status::unavailable(format!("saga log: {e}"));
        let shared = self.db.backend() == Backend::Postgres;
        if shared {
            let sent = Instant::now();
            self.db
                .register_replica(&self.replica, self.lease())
                .await
                .map_err(db_err)?;
            self.lease_held(Some(sent + self.lease()));
            let gone = self
                .db
                .expire_gone_replicas(self.replica.id, &self.replica.local_key, &pid_alive)
                .await
                .map_err(db_err)?;
            for r in gone {
                tracing::info!(replica = %r.id, name = %r.name, "an earlier coordinator on this host is gone; its lease ends now");
            }
            if let Err(e) = self.db.forget_old_replicas(Duration::from_secs(24 * 3600)).await {
                tracing::warn!(error = %e, "forgetting old coordinator replicas failed");
            }
        }
        let n = self.adopt(!shared).await.map_err(db_err)?;
        if shared && !self.heartbeat.swap(true, Ordering::SeqCst) {
            self.spawn_heartbeat();
        }
        if !shared {
            // The one coordinator of its database (its file lock says so).
            self.lease_held(Some(Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600)));
        }
        Ok(n)
    }

    fn lease_held(&self, until: Option<Instant>) {
        *self.lease_held_until.lock().expect("poisoned") = until;
    }

    /// Whether this replica holds a live lease (it may run sagas and adopt
    /// others'): what its readiness says. Err says why not.
    pub fn lease_status(&self) -> Result<Duration, &'static str> {
        match *self.lease_held_until.lock().expect("poisoned") {
            None => Err("no lease: not registered yet, or its lease ran out"),
            Some(until) => until
                .checked_duration_since(Instant::now())
                .filter(|left| !left.is_zero())
                .ok_or("its lease ran out and was not renewed in time"),
        }
    }

    /// Adopts orphaned sagas (all unfinished sagas of others, with `all`)
    /// and runs them.
    async fn adopt(self: &Arc<Self>, all: bool) -> Result<usize, crate::db::DbError> {
        let sagas = self.db.adopt_sagas(self.replica.id, all).await?;
        for s in &sagas {
            tracing::info!(saga = %s.id, name = %s.name, state = ?s.state, generation = s.generation, "adopted saga; resuming it");
            self.spawn(s.id);
        }
        Ok(sagas.len())
    }

    /// Renews the lease and adopts orphaned sagas each third of a lease,
    /// for as long as the executor lives. Also runs this replica's own
    /// unfinished sagas that are not running (one whose execution stopped
    /// on a database error, say), unless parked.
    fn spawn_heartbeat(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(lease) = weak.upgrade().map(|e| e.lease()) else {
                    return;
                };
                tokio::time::sleep(lease / 3).await;
                let Some(this) = weak.upgrade() else { return };
                let sent = Instant::now();
                match this.db.renew_lease(this.replica.id, lease).await {
                    Ok(true) => this.lease_held(Some(sent + lease)),
                    Ok(false) => {
                        this.lease_held(None);
                        // Frozen, or cut off from the database, past the
                        // lease: the others may have adopted its sagas, whose
                        // every write is now refused. Stop them all at once,
                        // then join again as a fresh member.
                        tracing::warn!(replica = %this.replica.id, "this coordinator's lease ran out; stopping its sagas and registering again");
                        this.abandon_all();
                        let sent = Instant::now();
                        match this.db.register_replica(&this.replica, lease).await {
                            Ok(()) => this.lease_held(Some(sent + lease)),
                            Err(e) => {
                                tracing::warn!(error = %e, "registering the coordinator replica again failed")
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "renewing the coordinator's lease failed"),
                }
                if let Err(e) = this.adopt(false).await {
                    tracing::warn!(error = %e, "adopting orphaned sagas failed");
                }
                match this.db.list_unfinished_sagas().await {
                    Ok(sagas) => {
                        for s in sagas {
                            let op = s.operation_id.unwrap_or(s.id);
                            if s.owner == this.owner && s.parked.is_none() && !this.is_running(op) {
                                tracing::info!(saga = %s.id, name = %s.name, "own saga not running; resuming it");
                                this.spawn(s.id);
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "listing unfinished sagas failed"),
                }
            }
        });
    }

    /// Whether the saga of `operation_id` is executing in this process.
    pub fn is_running(&self, operation_id: Uuid) -> bool {
        self.running.lock().expect("poisoned").contains_key(&operation_id)
    }

    /// Asks the saga of `operation_id` to stop; false if it is not running here.
    pub fn cancel(&self, operation_id: Uuid) -> bool {
        match self.running.lock().expect("poisoned").get(&operation_id) {
            Some(t) => {
                t.cancel();
                true
            }
            None => false,
        }
    }

    fn spawn(self: &Arc<Self>, saga_id: Uuid) {
        let this = self.clone();
        self.in_background(saga_id, async move { this.execute(saga_id).await });
    }

    /// Runs an execution of `saga_id` until it ends or this replica loses
    /// its lease, whichever comes first.
    fn in_background(
        &self,
        saga_id: Uuid,
        execution: impl std::future::Future<Output = Result<(), Status>> + Send + 'static,
    ) {
        let lost = self.lease_lost.lock().expect("poisoned").clone();
        tokio::spawn(async move {
            let result = tokio::select! {
                r = execution => r,
                _ = lost.cancelled() => Err(Status::aborted(
                    "this coordinator's lease ran out; the saga is left to the replica that owns it now",
                )),
            };
            if let Err(e) = result {
                tracing::error!(saga = %saga_id, error = %e, "saga execution stopped; it resumes at the next start");
            }
        });
    }

    /// Stops every execution of this replica (see `lease_lost`).
    fn abandon_all(&self) {
        let old = std::mem::replace(
            &mut *self.lease_lost.lock().expect("poisoned"),
            CancellationToken::new(),
        );
        old.cancel();
    }

    /// Ends this replica's lease now (a clean stop): the other replicas
    /// adopt its unfinished sagas at their next heartbeat instead of after
    /// the lease.
    pub async fn give_up_lease(&self) {
        if self.heartbeat.load(Ordering::SeqCst) {
            if let Err(e) = self.db.expire_lease(self.replica.id).await {
                tracing::warn!(error = %e, "ending the coordinator's lease failed");
            }
        }
    }

    /// The owner name this executor records on the sagas it runs.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Whether a saga of this name is defined.
    pub fn defines(&self, name: &str) -> bool {
        self.sagas.contains_key(name)
    }

    /// The name of the saga's first node (logged as started when the
    /// operation is accepted); None for a saga not defined.
    pub fn first_node(&self, name: &str) -> Option<&'static str> {
        self.sagas.get(name).and_then(|d| d.nodes.first()).map(|n| n.name)
    }

    /// Runs a saga just recorded with its first node's start
    /// ([`crate::db::Database::accept_operation`]): nothing is read back.
    /// It counts as running (a cancel reaches it) when this returns.
    pub fn run_accepted(self: &Arc<Self>, saga: Saga) {
        let operation_id = saga.operation_id.unwrap_or(saga.id);
        let Some(running) = self.register(operation_id) else {
            return;
        };
        let this = self.clone();
        self.in_background(saga.id, async move {
            this.drive(saga, Vec::new(), running, Some(0)).await
        });
    }

    /// Marks the operation's saga as executing here; None if it already is.
    fn register(self: &Arc<Self>, operation_id: Uuid) -> Option<Running<S>> {
        let cancel = CancellationToken::new();
        let mut running = self.running.lock().expect("poisoned");
        if running.contains_key(&operation_id) {
            return None;
        }
        running.insert(operation_id, cancel.clone());
        Some(Running {
            cancel,
            _guard: RunningGuard {
                exec: self.clone(),
                operation_id,
            },
        })
    }

    async fn execute(self: &Arc<Self>, saga_id: Uuid) -> Result<(), Status> {
        let db_err = |e: crate::db::DbError| Status::unavailable(format!("saga log: {e}"));
        let saga = self.db.get_saga(saga_id).await.map_err(db_err)?;
        let operation_id = saga.operation_id.unwrap_or(saga_id);
        let Some(running) = self.register(operation_id) else {
            return Ok(()); // already executing in this process
        };
        // Read again now that no other execution here can end it: one that
        // just ended has committed its end, which must not run again (an
        // unwound saga run forward).
        let saga = self.db.get_saga(saga_id).await.map_err(db_err)?;
        if !matches!(saga.state, SagaState::Running | SagaState::Unwinding) {
            return Ok(());
        }
        if let Ok(op) = self.db.get_operation(operation_id).await {
            if op.cancel_requested {
                running.cancel.cancel();
            }
        }
        let events = self.db.saga_node_events(saga_id).await.map_err(db_err)?;
        self.drive(saga, events, running, None).await
    }

    /// Runs `saga` on from its log, `events`; `start_logged` is a node
    /// whose start is logged although `events` do not show it.
    async fn drive(
        self: &Arc<Self>,
        saga: Saga,
        events: Vec<crate::db::SagaNodeEvent>,
        running: Running<S>,
        start_logged: Option<usize>,
    ) -> Result<(), Status> {
        let saga_id = saga.id;
        let operation_id = saga.operation_id.unwrap_or(saga_id);
        let Some(def) = self.sagas.get(saga.name.as_str()).cloned() else {
            let reason = format!("this release has no saga named {:?}", saga.name);
            return self.park(&saga, operation_id, &reason).await;
        };
        let log_ids = match align(&def, &events) {
            Ok(ids) => ids,
            Err(reason) => return self.park(&saga, operation_id, &reason).await,
        };
        if saga.parked.is_some() {
            // It fits this release (a roll-back, say): it runs again.
            self.db
                .set_saga_parked(saga_id, saga.generation, None)
                .await
                .map_err(|e| Status::unavailable(format!("saga log: {e}")))?;
            tracing::info!(saga = %saga_id, saga_name = def.name, "parked saga fits this release; resuming");
        }
        let cancel = running.cancel.clone();
        let mut outputs = HashMap::new();
        for (i, node) in def.nodes.iter().enumerate() {
            if let Some(e) = events
                .iter()
                .find(|e| e.node_id == log_ids[i] && e.event_type == SagaNodeEventType::Succeeded)
            {
                outputs.insert(node.name, e.data.clone().unwrap_or(Value::Null));
            }
        }
        let cx = SagaCx {
            app: self.app.clone(),
            saga_id,
            operation_id,
            params: saga.params.clone(),
            outputs: Mutex::new(outputs),
            cancel: cancel.clone(),
            // Every write a node makes through `cx.db()` is fenced by the
            // generation this execution owns the saga at.
            db: self.db.for_saga((saga_id, saga.generation)),
            progress_written: Mutex::new(None),
            notify: self.notify.clone(),
            memos: Mutex::new(HashMap::new()),
            log_ids,
            generation: saga.generation,
        };
        let has = has_fn(&events, &cx.log_ids);

        let saga_started = Instant::now();
        let span = tracing::info_span!("saga", saga = %saga_id, saga_name = def.name);
        if let Some(tp) = saga.params.get(TRACEPARENT).and_then(|v| v.as_str()) {
            ramsnap_common::tracecontext::continue_trace(&span, tp);
        }
        let outcome = if saga.state == SagaState::Unwinding {
            let failure = events
                .iter()
                .find(|e| e.event_type == SagaNodeEventType::Failed)
                .and_then(|e| e.data.clone())
                .map(|v| Status::from(crate::error::Error::from_json(v)))
                .unwrap_or_else(|| Status::aborted("unwound after a restart"));
            let cancelled = failure.code() == Code::Cancelled;
            self.unwind(&def, &cx, &has).instrument(span).await?;
            Outcome::Unwound {
                status: failure,
                cancelled,
            }
        } else {
            self.run_forward(&def, &cx, &has, start_logged)
                .instrument(span)
                .await?
        };
        let unwound = matches!(outcome, Outcome::Unwound { .. });
        let finished = self.finish(&def, &cx, outcome).await;
        let result = match (&finished, unwound) {
            (Err(_), _) => "failed",
            (Ok(_), true) => "unwound",
            (Ok(_), false) => "succeeded",
        };
        ramsnap_common::metrics::record_saga(def.name, result, saga_started.elapsed().as_secs_f64());
        tracing::info!(
            saga = %saga_id, saga_name = def.name, unwound,
            ms = saga_started.elapsed().as_millis() as u64, "saga done"
        );
        finished
    }

    async fn run_forward(
        self: &Arc<Self>,
        def: &SagaDef<S>,
        cx: &SagaCx<S>,
        has: &(dyn Fn(usize, SagaNodeEventType) -> bool + Sync),
        mut start_logged: Option<usize>,
    ) -> Result<Outcome, Status> {
        let db_err = |e: crate::db::DbError| Status::unavailable(format!("saga log: {e}"));
        // Events not committed yet: those of local nodes, which go with the
        // next commit (the start of a node that is not local, a failure, or
        // the saga's end).
        let mut pending = Pending::default();
        for (i, node) in def.nodes.iter().enumerate() {
            if has(i, SagaNodeEventType::Succeeded) {
                continue;
            }
            let reversible = node.undo.is_some();
            if reversible && cx.cancel.is_cancelled() {
                let status = Status::cancelled("cancelled by request");
                self.db
                    .append_saga_node_events(cx.saga_id, cx.generation, &pending.take())
                    .await
                    .map_err(db_err)?;
                self.db
                    .set_saga_state(cx.saga_id, cx.generation, SagaState::Unwinding)
                    .await
                    .map_err(db_err)?;
                let events = self.db.saga_node_events(cx.saga_id).await.map_err(db_err)?;
                self.unwind(def, cx, &has_fn(&events, &cx.log_ids)).await?;
                return Ok(Outcome::Unwound {
                    status,
                    cancelled: true,
                });
            }
            // A node that had started in an earlier process may have reached
            // an agent: its outcome is unknown until an agent answers.
            let mut in_doubt = has(i, SagaNodeEventType::Started);
            if start_logged != Some(i) {
                pending.push(event(def, cx, i, SagaNodeEventType::Started, None));
                if !node.is_local(&cx.params) {
                    self.db
                        .append_saga_node_events(cx.saga_id, cx.generation, &pending.take())
                        .await
                        .map_err(db_err)?;
                }
            }
            self.failpoints.crash(def.name, node.name, "crash");
            if self.failpoints.hit(def.name, node.name, "halt") {
                return Err(Status::aborted(format!("halted at {}.{}", def.name, node.name)));
            }
            self.failpoints.hold(def.name, node.name).await;
            // Each node's forward action in a span of its own (exported over
            // OTLP with the calls it makes), and its time logged: where a
            // saga spends its time shows at once.
            let span =
                tracing::info_span!("saga_node", saga = %cx.saga_id, saga_name = def.name, node = node.name);
            let node_started = Instant::now();
            let mut attempt = 0u32;
            let output = loop {
                let result = if self.failpoints.hit(def.name, node.name, "error") {
                    Err(Status::internal(format!(
                        "injected failure at {}.{}",
                        def.name, node.name
                    )))
                } else {
                    fence::scope(cx.fence(), (node.forward)(cx))
                        .instrument(span.clone())
                        .await
                };
                match result {
                    Ok(v) => break v,
                    // Another replica owns the saga now (an agent saw its
                    // newer generation): stop here, neither retry nor unwind.
                    Err(status) if fence::is_stale_owner(&status) => return Err(status),
                    Err(status) if !reversible => {
                        // Past the point of no return: retry until it goes through.
                        attempt += 1;
                        tracing::warn!(saga = %cx.saga_id, node = node.name, attempt, error = %status, "retrying");
                        tokio::time::sleep(self.backoff(attempt)).await;
                    }
                    // The agent (or the database) did not answer: the step did
                    // not fail, its outcome is unknown. Unwinding now could undo
                    // what the agent did after all (delete the overlay a guest
                    // writes to), so the node asks again until it gets an
                    // answer. A cancel ends the wait only while no call can
                    // have reached the agent.
                    Err(status) if outcome_unknown(&status) && (in_doubt || !cx.cancel.is_cancelled()) => {
                        in_doubt |= may_have_arrived(&status);
                        attempt += 1;
                        tracing::warn!(
                            saga = %cx.saga_id, node = node.name, attempt, in_doubt, error = %status,
                            "no answer; asking again"
                        );
                        tokio::select! {
                            _ = tokio::time::sleep(self.backoff(attempt)) => {}
                            _ = cx.cancel.cancelled(), if !in_doubt => {}
                        }
                    }
                    Err(status) => {
                        let status = if outcome_unknown(&status) {
                            Status::cancelled(format!(
                                "cancelled by request while waiting for an answer ({})",
                                status.message()
                            ))
                        } else {
                            status
                        };
                        tracing::warn!(saga = %cx.saga_id, node = node.name, error = %status, "node failed; unwinding");
                        // The local nodes' events first: their undo runs too.
                        pending.push(event(
                            def,
                            cx,
                            i,
                            SagaNodeEventType::Failed,
                            Some(crate::error::Error::from(&status).to_json()),
                        ));
                        self.db
                            .append_saga_node_events(cx.saga_id, cx.generation, &pending.take())
                            .await
                            .map_err(db_err)?;
                        self.db
                            .set_saga_state(cx.saga_id, cx.generation, SagaState::Unwinding)
                            .await
                            .map_err(db_err)?;
                        let events = self.db.saga_node_events(cx.saga_id).await.map_err(db_err)?;
                        self.unwind(def, cx, &has_fn(&events, &cx.log_ids)).await?;
                        let cancelled = status.code() == Code::Cancelled;
                        return Ok(Outcome::Unwound { status, cancelled });
                    }
                }
            };
            tracing::info!(
                saga = %cx.saga_id, saga_name = def.name, node = node.name,
                ms = node_started.elapsed().as_millis() as u64, attempts = attempt + 1,
                "saga node done"
            );
            self.failpoints.crash(def.name, node.name, "crash_after");
            if self.failpoints.hit(def.name, node.name, "halt_after") {
                return Err(Status::aborted(format!(
                    "halted after {}.{}",
                    def.name, node.name
                )));
            }
            pending.push(event(
                def,
                cx,
                i,
                SagaNodeEventType::Succeeded,
                Some(output.clone()),
            ));
            cx.outputs.lock().expect("poisoned").insert(node.name, output);
            // The next node's start goes in the same commit, unless a cancel
            // is to stop the saga before it (checked again at its turn: a
            // start logged for nothing is undone as any started node is,
            // as after a crash right after the log). A local next node's
            // start waits for the commit after it too; the last node's
            // success goes with the operation's end.
            let next = i + 1;
            match def.nodes.get(next) {
                None => {}
                Some(n) if n.undo.is_some() && cx.cancel.is_cancelled() => {
                    self.db
                        .append_saga_node_events(cx.saga_id, cx.generation, &pending.take())
                        .await
                        .map_err(db_err)?;
                }
                Some(n) if n.is_local(&cx.params) => {}
                Some(_) => {
                    pending.push(event(def, cx, next, SagaNodeEventType::Started, None));
                    self.db
                        .append_saga_node_events(cx.saga_id, cx.generation, &pending.take())
                        .await
                        .map_err(db_err)?;
                    start_logged = Some(next);
                }
            }
        }
        Ok(Outcome::Done {
            pending: pending.take(),
        })
    }

    /// Undoes, last first, every node that started and is not undone yet.
    async fn unwind(
        &self,
        def: &SagaDef<S>,
        cx: &SagaCx<S>,
        has: &(dyn Fn(usize, SagaNodeEventType) -> bool + Sync),
    ) -> Result<(), Status> {
        let db_err = |e: crate::db::DbError| Status::unavailable(format!("saga log: {e}"));
        for (i, node) in def.nodes.iter().enumerate().rev() {
            if !has(i, SagaNodeEventType::Started) || has(i, SagaNodeEventType::UndoFinished) {
                continue;
            }
            let Some(undo) = node.undo else { continue };
            self.db
                .append_saga_node_event(
                    cx.saga_id,
                    cx.generation,
                    (cx.log_ids[i], node.name),
                    SagaNodeEventType::UndoStarted,
                    None,
                )
                .await
                .map_err(db_err)?;
            let mut attempt = 0u32;
            loop {
                let result = if self.failpoints.hit(def.name, node.name, "undo_error") {
                    Err(Status::unavailable(format!(
                        "injected undo failure at {}.{}",
                        def.name, node.name
                    )))
                } else {
                    fence::scope(cx.fence(), undo(cx)).await
                };
                match result {
                    Ok(()) => break,
                    Err(status) if fence::is_stale_owner(&status) => return Err(status),
                    Err(status) => {
                        attempt += 1;
                        tracing::warn!(saga = %cx.saga_id, node = node.name, attempt, error = %status, "undo failed; retrying");
                        tokio::time::sleep(self.backoff(attempt)).await;
                    }
                }
            }
            self.db
                .append_saga_node_event(
                    cx.saga_id,
                    cx.generation,
                    (cx.log_ids[i], node.name),
                    SagaNodeEventType::UndoFinished,
                    None,
                )
                .await
                .map_err(db_err)?;
        }
        Ok(())
    }

    async fn finish(&self, def: &SagaDef<S>, cx: &SagaCx<S>, outcome: Outcome) -> Result<(), Status> {
        let db_err = |e: crate::db::DbError| Status::unavailable(format!("saga log: {e}"));
        let ended = match outcome {
            Outcome::Done { pending } => {
                let result = def
                    .result_node
                    .and_then(|n| cx.outputs.lock().expect("poisoned").get(n).cloned());
                self.db
                    .finish_saga(
                        (cx.saga_id, cx.generation),
                        &pending,
                        cx.operation_id,
                        OperationState::Succeeded,
                        None,
                        result.as_ref(),
                    )
                    .await
                    .map_err(db_err)?
            }
            Outcome::Unwound { status, cancelled } => {
                let state = if cancelled {
                    OperationState::Cancelled
                } else {
                    OperationState::Failed
                };
                let error = crate::error::Error::from(&status).encode();
                self.db
                    .finish_saga(
                        (cx.saga_id, cx.generation),
                        &[],
                        cx.operation_id,
                        state,
                        Some(&error),
                        None,
                    )
                    .await
                    .map_err(db_err)?
            }
        };
        (self.notify)(cx.operation_id, ended);
        Ok(())
    }

    /// Leaves a saga whose log does not fit this release's definition
    /// unexecuted, with why on the saga and as a warning on its operation:
    /// it keeps its locks (what it did is unknown to this release), and it
    /// is tried again at every start (see [`align`]).
    async fn park(&self, saga: &Saga, operation_id: Uuid, reason: &str) -> Result<(), Status> {
        let db_err = |e: crate::db::DbError| Status::unavailable(format!("saga log: {e}"));
        tracing::error!(saga = %saga.id, saga_name = %saga.name, reason, "saga parked: its log does not fit this release");
        let why = format!("saga {} ({}) is parked: {reason}", saga.id, saga.name);
        self.db
            .set_saga_parked(saga.id, saga.generation, Some(&why))
            .await
            .map_err(db_err)?;
        if self
            .db
            .add_operation_warning(operation_id, &why)
            .await
            .map_err(db_err)?
        {
            (self.notify)(operation_id, None);
        }
        Err(Status::failed_precondition(why))
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let ms = 50u64.saturating_mul(1 << attempt.min(10));
        Duration::from_millis(ms).min(self.retry_cap)
    }
}

/// A saga executing here: its cancel token, and its entry in `running`
/// until dropped.
struct Running<S: Send + Sync + 'static> {
    cancel: CancellationToken,
    _guard: RunningGuard<S>,
}

struct RunningGuard<S: Send + Sync + 'static> {
    exec: Arc<Executor<S>>,
    operation_id: Uuid,
}

impl<S: Send + Sync + 'static> Drop for RunningGuard<S> {
    fn drop(&mut self) {
        self.exec
            .running
            .lock()
            .expect("poisoned")
            .remove(&self.operation_id);
    }
}

/// Whether the log `events` has an event of type `t` for the definition's
/// node `node` (at its log id, `log_ids[node]`).
fn has_fn<'a>(
    events: &'a [crate::db::SagaNodeEvent],
    log_ids: &'a [u32],
) -> impl Fn(usize, SagaNodeEventType) -> bool + Sync + 'a {
    move |node, t| {
        events
            .iter()
            .any(|e| e.node_id == log_ids[node] && e.event_type == t)
    }
}

/// An event of the definition's node `i`, under its log id and name.
fn event<S>(
    def: &SagaDef<S>,
    cx: &SagaCx<S>,
    i: usize,
    event_type: SagaNodeEventType,
    data: Option<Value>,
) -> PendingEvent {
    PendingEvent {
        node_id: cx.log_ids[i],
        node_name: def.nodes[i].name,
        event_type,
        data,
    }
}

/// Lines a saga's log up with the saga's definition in this release, by
/// node names, and returns the log id of each node of the definition: the
/// id it was logged under, and for a node not logged yet a new id after
/// every logged one (so a saga begun by an older release resumes on the
/// definition it meets). Events logged before the log named nodes are read
/// by position, as they were written.
///
/// The log fits when the nodes it names are, in log order, the first nodes
/// of the definition: a release may add nodes after the point a saga
/// reached. It does not fit (Err, why) when it names a node the definition
/// does not have, or when a node of the definition comes before a logged
/// node but has no record: running it now, after the nodes that follow
/// it, or skipping it, would each be a guess.
fn align<S>(def: &SagaDef<S>, events: &[crate::db::SagaNodeEvent]) -> Result<Vec<u32>, String> {
    let mut logged: Vec<(u32, usize)> = Vec::new();
    for e in events {
        let index = match &e.node_name {
            Some(name) => def.nodes.iter().position(|n| n.name == name).ok_or_else(|| {
                format!(
                    "its log names node {name:?}, which saga {} no longer has",
                    def.name
                )
            })?,
            None => usize::try_from(e.node_id)
                .ok()
                .filter(|&i| i < def.nodes.len())
                .ok_or_else(|| {
                    format!(
                        "its log names node #{} by position, and saga {} has {} nodes",
                        e.node_id,
                        def.name,
                        def.nodes.len()
                    )
                })?,
        };
        match logged.iter().find(|(id, _)| *id == e.node_id) {
            Some(&(_, seen)) if seen != index => {
                return Err(format!(
                    "its log names two nodes ({:?} and {:?}) under one id, {}",
                    def.nodes[seen].name, def.nodes[index].name, e.node_id
                ));
            }
            Some(_) => {}
            None => logged.push((e.node_id, index)),
        }
    }
    logged.sort_unstable();
    for (position, &(_, index)) in logged.iter().enumerate() {
        if index != position {
            let missing = def.nodes[position].name;
            let recorded = def.nodes[index].name;
            return Err(if logged.iter().any(|&(_, i)| i == position) {
                format!(
                    "its log ran node {recorded:?} before node {missing:?}, in the other order from saga {}'s nodes now",
                    def.name
                )
            } else {
                format!(
                    "saga {} now has node {missing:?} before node {recorded:?}, and its log has no record of it: \
                     it was begun by a release without that node",
                    def.name
                )
            });
        }
    }
    let mut next = logged.last().map_or(0, |&(id, _)| id + 1);
    let ids = (0..def.nodes.len())
        .map(|i| match logged.get(i) {
            Some(&(id, _)) => id,
            None => {
                next += 1;
                next - 1
            }
        })
        .collect();
    Ok(ids)
}

/// No answer came: the agent or the database could not be reached, or the
/// call ran out of time (what it asked for may or may not have happened);
/// or the agent refused it for now, being busy (RESOURCE_EXHAUSTED with a
/// RetryInfo: its concurrency limit), and nothing happened. Either way the
/// step is asked again, not unwound.
pub fn outcome_unknown(s: &Status) -> bool {
    matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded) || busy(s)
}

/// An agent's "too busy, retry later" (its limits layer), as opposed to a
/// domain without room (RESOURCE_EXHAUSTED without a RetryInfo).
fn busy(s: &Status) -> bool {
    s.code() == Code::ResourceExhausted && s.get_error_details().retry_info().is_some()
}

/// Whether a call that ended with this (unknown-outcome) status may have
/// reached the agent: anything but a refused connection or a busy refusal
/// may have.
pub(crate) fn may_have_arrived(s: &Status) -> bool {
    if busy(s) {
        return false;
    }
    let m = s.message();
    !(m.contains("tcp connect error")
        || m.contains("error trying to connect")
        || m.contains("Connection refused"))
}

/// How long a replica's lease lasts unless set otherwise: the time after
/// which the other replicas adopt the sagas of one that stopped answering.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);

/// The machine boot and PID namespace this process runs in: PIDs are
/// comparable only within both.
fn local_key() -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let ns = std::fs::read_link("/proc/self/ns/pid")
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    format!("{}/{ns}", boot.trim())
}

/// Whether a process `pid` exists here (a PID taken again by another
/// process counts as alive: its lease then runs out instead).
fn pid_alive(pid: i64) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return true;
    };
    if pid <= 0 {
        return true;
    }
    // SAFETY: signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    let exists = r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH);
    // A zombie (killed, not yet reaped by its parent) has ended.
    exists && !is_zombie(pid)
}

fn is_zombie(pid: libc::pid_t) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next())
        })
        .is_some_and(|state| state == 'Z')
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "coordinator".into())
}
