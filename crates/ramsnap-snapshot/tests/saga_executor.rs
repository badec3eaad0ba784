//! The saga executor on a real SQLite saga log, with a toy saga whose
//! actions make and remove named resources in memory (the fake is the
//! resources, not the executor or the log). The three generic harnesses
//! omicron runs on every saga: an error injected at every node unwinds
//! cleanly; a crash at every node (before and after the action) resumes
//! and completes; undo steps that fail once still unwind.
use futures::future::BoxFuture;
use futures::FutureExt;
use ramsnap_snapshot::db::{Database, NewOperation, OperationState, SagaNodeEventType, SagaState};
use ramsnap_snapshot::saga::{Executor, Failpoints, Node, Output, SagaCx, SagaDef};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::Status;
use uuid::Uuid;

#[derive(Default)]
struct Toy {
    resources: Mutex<BTreeSet<String>>,
    /// How many times each forward action ran (replays included).
    runs: Mutex<Vec<&'static str>>,
    /// Node b's agent does not answer this many times, with this message.
    unanswered: Mutex<(u32, &'static str)>,
    /// Node b's agent is too busy this many times (RESOURCE_EXHAUSTED with a
    /// RetryInfo, as the limits layer answers).
    busy: Mutex<u32>,
    /// What node c's progress reports left in the operation, and whether
    /// the second came within the progress interval of the first.
    progress: Mutex<Vec<(u64, u64)>>,
    progress_quick: Mutex<bool>,
    /// How many events the saga's log held when node b ran.
    log_seen_by_b: Mutex<Option<usize>>,
}

fn make(cx: &SagaCx<Toy>, name: &'static str) -> Result<Value, Status> {
    cx.app.runs.lock().unwrap().push(name);
    // "ensure": making what exists is a no-op.
    cx.app
        .resources
        .lock()
        .unwrap()
        .insert(format!("{}:{name}", cx.saga_id));
    Ok(json!({ "made": name }))
}

fn remove(cx: &SagaCx<Toy>, name: &'static str) -> Result<(), Status> {
    cx.app
        .resources
        .lock()
        .unwrap()
        .remove(&format!("{}:{name}", cx.saga_id));
    Ok(())
}

fn a(cx: &SagaCx<Toy>) -> BoxFuture<'_, Result<Value, Status>> {
    async move { make(cx, "a") }.boxed()
}
fn a_undo(cx: &SagaCx<Toy>) -> BoxFuture<'_, Result<(), Status>> {
    async move { remove(cx, "a") }.boxed()
}
fn b(cx: &SagaCx<Toy>) -> BoxFuture<'_, Result<Value, Status>> {
    async move {
        // Needs a's output: outputs survive a restart through the log.
        let out: Value = cx.output("a")?;
        assert_eq!(out["made"], "a");
        let log = cx.db().saga_node_events(cx.saga_id).await.unwrap();
        *cx.app.log_seen_by_b.lock().unwrap() = Some(log.len());
        {
            let mut b = cx.app.busy.lock().unwrap();
            if *b > 0 {
                *b -= 1;
                cx.app.runs.lock().unwrap().push("b~");
                return Err(<Status as tonic_types::StatusExt>::with_error_details(
                    tonic::Code::ResourceExhausted,
                    "the server already runs 256 concurrent calls; retry later",
                    tonic_types::ErrorDetails::with_retry_info(Some(Duration::from_millis(10))),
                ));
            }
        }
        {
            let mut u = cx.app.unanswered.lock().unwrap();
            if u.0 > 0 {
                u.0 -= 1;
                cx.app.runs.lock().unwrap().push("b?");
                return Err(Status::unavailable(u.1));
            }
        }
        make(cx, "b")
    }
    .boxed()
}
fn b_undo(cx: &SagaCx<Toy>) -> BoxFuture<'_, Result<(), Status>> {
    async move { remove(cx, "b") }.boxed()
}
fn c(cx: &SagaCx<Toy>) -> BoxFuture<'_, Result<Value, Status>> {
    async move {
        // Progress: the first report is written, one right after it is
        // not (each is a commit), reaching the total always is.
        let t = std::time::Instant::now();
        let mut seen = Vec::new();
        for (done, total) in [(1, 10), (2, 10), (10, 10)] {
            cx.progress(done, total).await;
            let o = cx.db().get_operation(cx.operation_id).await.unwrap();
            seen.push((o.progress_processed, o.progress_total));
            if done == 2 {
                *cx.app.progress_quick.lock().unwrap() =
                    t.elapsed() < ramsnap_snapshot::saga::PROGRESS_INTERVAL;
            }
        }
        *cx.app.progress.lock().unwrap() = seen;
        make(cx, "c")
    }
    .boxed()
}
fn d(cx: &SagaCx<Toy>) -> BoxFuture<'_, Result<Value, Status>> {
    async move { make(cx, "d") }.boxed()
}

const NODES: [&str; 4] = ["a", "b", "c", "d"];

/// The toy saga with the nodes named in `local` marked local (their log
/// events wait for the next commit).
fn toy_with_local(local: &[&str]) -> SagaDef<Toy> {
    let mut def = SagaDef {
        name: "toy",
        nodes: vec![
            Node::new(Output::new("a"), a).undo(a_undo),
            Node::new(Output::new("b"), b).undo(b_undo),
            // Past the point of no return.
            Node::new(Output::new("c"), c),
            Node::new(Output::new("d"), d),
        ],
        result_node: Some("b"),
    };
    for n in &mut def.nodes {
        n.local = local.contains(&n.name);
    }
    def
}

struct Env {
    _dir: tempfile::TempDir,
    db: Database,
    app: Arc<Toy>,
}

async fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::connect(&format!("sqlite:{}", dir.path().join("log.db").display()))
        .await
        .unwrap();
    db.migrate().await.unwrap();
    Env {
        _dir: dir,
        db,
        app: Arc::new(Toy::default()),
    }
}

fn executor(env: &Env, failpoints: &str) -> Arc<Executor<Toy>> {
    executor_with_local(env, failpoints, &[])
}

fn executor_with_local(env: &Env, failpoints: &str, local: &[&str]) -> Arc<Executor<Toy>> {
    Executor::new(
        env.db.clone(),
        env.app.clone(),
        vec![toy_with_local(local)],
        Failpoints::parse(failpoints),
        Arc::new(|_, _| {}),
    )
}

async fn start(env: &Env, exec: &Arc<Executor<Toy>>) -> (Uuid, Uuid) {
    start_with(env, exec, json!({})).await
}

/// [`start`] with the saga's parameters.
async fn start_with(env: &Env, exec: &Arc<Executor<Toy>>, params: Value) -> (Uuid, Uuid) {
    let op = Uuid::new_v4();
    env.db
        .create_operation(&NewOperation {
            id: op,
            kind: "toy".into(),
            vm_id: None,
            request_id: None,
            warnings: vec![],
        })
        .await
        .unwrap();
    let saga = exec.start("toy", params, op).await.unwrap();
    (op, saga)
}

/// Waits until the saga stops running here: done, or halted (still RUNNING
/// or UNWINDING in the log, like after a crash).
async fn settle(env: &Env, op: Uuid, saga: Uuid) -> (OperationState, SagaState) {
    for _ in 0..400 {
        let o = env.db.get_operation(op).await.unwrap();
        let s = env.db.get_saga(saga).await.unwrap();
        if o.state.is_terminal() && s.state == SagaState::Done {
            return (o.state, s.state);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let o = env.db.get_operation(op).await.unwrap();
    (o.state, env.db.get_saga(saga).await.unwrap().state)
}

fn resources(env: &Env, saga: Uuid) -> Vec<String> {
    let prefix = format!("{saga}:");
    env.app
        .resources
        .lock()
        .unwrap()
        .iter()
        .filter_map(|r| r.strip_prefix(&prefix).map(String::from))
        .collect()
}

/// What the executor told watchers: the operation's id, and the operation
/// when it ended.
type Pushed = (Uuid, Option<ramsnap_snapshot::db::Operation>);

/// The executor tells the operation's watchers of its end with the
/// operation as the database now holds it, succeeded or failed, so that
/// they need not read it.
#[tokio::test]
async fn the_end_is_pushed_with_the_operation_as_recorded() {
    let env = env().await;
    for failpoints in ["", "toy.b=error"] {
        let pushed: Arc<std::sync::Mutex<Vec<Pushed>>> = Default::default();
        let seen = pushed.clone();
        let exec = Executor::new(
            env.db.clone(),
            env.app.clone(),
            vec![toy_with_local(&[])],
            Failpoints::parse(failpoints),
            Arc::new(move |id, now| seen.lock().unwrap().push((id, now))),
        );
        let (op, saga) = start(&env, &exec).await;
        let (state, _) = settle(&env, op, saga).await;
        assert!(state.is_terminal(), "{failpoints}: {state:?}");
        let last = pushed.lock().unwrap().last().cloned();
        let recorded = env.db.get_operation(op).await.unwrap();
        assert_eq!(last, Some((op, Some(recorded))), "{failpoints}");
        // Progress reports before the end carry nothing: watchers read.
        assert!(pushed
            .lock()
            .unwrap()
            .iter()
            .rev()
            .skip(1)
            .all(|(_, now)| now.is_none()));
    }
}

#[tokio::test]
async fn a_saga_runs_to_the_end() {
    let env = env().await;
    let exec = executor(&env, "");
    let (op, saga) = start(&env, &exec).await;
    assert_eq!(
        settle(&env, op, saga).await,
        (OperationState::Succeeded, SagaState::Done)
    );
    assert_eq!(resources(&env, saga), ["a", "b", "c", "d"]);
    let o = env.db.get_operation(op).await.unwrap();
    assert_eq!(o.result, Some(json!({ "made": "b" })));
    // a's start and success, and b's start, were logged before b ran.
    assert_eq!(*env.app.log_seen_by_b.lock().unwrap(), Some(3));
    let seen = env.app.progress.lock().unwrap().clone();
    assert_eq!((seen[0], seen[2]), ((1, 10), (10, 10)));
    if *env.app.progress_quick.lock().unwrap() {
        assert_eq!(seen[1], (1, 10), "a report right after another is not written");
    }
}

#[tokio::test]
async fn an_error_at_any_reversible_node_unwinds_everything() {
    for node in ["a", "b"] {
        let env = env().await;
        let exec = executor(&env, &format!("toy.{node}=error"));
        let (op, saga) = start(&env, &exec).await;
        assert_eq!(
            settle(&env, op, saga).await,
            (OperationState::Failed, SagaState::Done),
            "{node}"
        );
        assert!(
            resources(&env, saga).is_empty(),
            "error at {node} left {:?}",
            resources(&env, saga)
        );
        let raw = env.db.get_operation(op).await.unwrap().error.unwrap();
        let err = ramsnap_snapshot::error::Error::decode(&raw);
        assert_eq!(err.code, "INTERNAL", "{raw}");
        assert!(err.message.starts_with("injected failure"), "{raw}");
    }
}

#[tokio::test]
async fn an_error_past_the_point_of_no_return_is_retried_to_completion() {
    for node in ["c", "d"] {
        let env = env().await;
        let exec = executor(&env, &format!("toy.{node}=error"));
        let (op, saga) = start(&env, &exec).await;
        assert_eq!(
            settle(&env, op, saga).await,
            (OperationState::Succeeded, SagaState::Done),
            "{node}"
        );
        assert_eq!(resources(&env, saga), ["a", "b", "c", "d"]);
    }
}

#[tokio::test]
async fn a_crash_at_any_node_resumes_and_completes() {
    for node in NODES {
        for point in ["halt", "halt_after"] {
            let env = env().await;
            let first = executor(&env, &format!("toy.{node}={point}"));
            let (op, saga) = start(&env, &first).await;
            let (state, saga_state) = settle(&env, op, saga).await;
            assert_eq!(
                (state, saga_state),
                (OperationState::Running, SagaState::Running),
                "{node} {point}"
            );
            // A new coordinator process finds the saga in the log.
            let second = executor(&env, "");
            assert_eq!(second.recover().await.unwrap(), 1);
            assert_eq!(
                settle(&env, op, saga).await,
                (OperationState::Succeeded, SagaState::Done),
                "{node} {point}"
            );
            assert_eq!(resources(&env, saga), ["a", "b", "c", "d"], "{node} {point}");
            // The halted node ran again after the restart (it is idempotent)
            // only when it had run before the crash.
            let runs = env
                .app
                .runs
                .lock()
                .unwrap()
                .iter()
                .filter(|n| **n == node)
                .count();
            assert_eq!(runs, if point == "halt_after" { 2 } else { 1 }, "{node} {point}");
        }
    }
}

#[tokio::test]
async fn a_crash_while_unwinding_resumes_the_unwinding() {
    let env = env().await;
    // b fails; while unwinding, a's undo fails once: the unwinding retries
    // and finishes. Then the same with a crash in the middle.
    let exec = executor(&env, "toy.b=error,toy.a=undo_error");
    let (op, saga) = start(&env, &exec).await;
    assert_eq!(
        settle(&env, op, saga).await,
        (OperationState::Failed, SagaState::Done)
    );
    assert!(resources(&env, saga).is_empty());
}

#[tokio::test]
async fn cancelling_unwinds_at_the_next_reversible_node() {
    let env = env().await;
    let exec = executor(&env, "toy.b=halt");
    let (op, saga) = start(&env, &exec).await;
    let (state, _) = settle(&env, op, saga).await;
    assert_eq!(state, OperationState::Running);
    // The client cancels while no process runs the saga; the next one
    // honours it.
    assert!(env.db.request_cancel(op).await.unwrap());
    let second = executor(&env, "");
    second.recover().await.unwrap();
    assert_eq!(
        settle(&env, op, saga).await,
        (OperationState::Cancelled, SagaState::Done)
    );
    assert!(resources(&env, saga).is_empty());
}

/// The message tonic gives a call whose connection was refused: it never
/// reached the agent.
const REFUSED: &str = "tcp connect error: Connection refused (os error 111)";
/// A call cut off mid-way: it may have reached the agent.
const CUT_OFF: &str = "h2 protocol error: error reading a body from connection";

#[tokio::test]
async fn a_step_without_an_answer_is_asked_again_not_unwound() {
    let env = env().await;
    *env.app.unanswered.lock().unwrap() = (3, CUT_OFF);
    let exec = executor(&env, "");
    let (op, saga) = start(&env, &exec).await;
    assert_eq!(
        settle(&env, op, saga).await,
        (OperationState::Succeeded, SagaState::Done)
    );
    assert_eq!(resources(&env, saga), ["a", "b", "c", "d"]);
    let runs = env.app.runs.lock().unwrap().clone();
    assert_eq!(runs, ["a", "b?", "b?", "b?", "b", "c", "d"]);
}

#[tokio::test]
async fn a_cancel_unwinds_a_step_whose_agent_was_never_reached() {
    let env = env().await;
    *env.app.unanswered.lock().unwrap() = (u32::MAX, REFUSED);
    let exec = executor(&env, "");
    let (op, saga) = start(&env, &exec).await;
    while !env.app.runs.lock().unwrap().contains(&"b?") {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(exec.cancel(op));
    assert_eq!(
        settle(&env, op, saga).await,
        (OperationState::Cancelled, SagaState::Done)
    );
    assert!(resources(&env, saga).is_empty(), "{:?}", resources(&env, saga));
}

#[tokio::test]
async fn a_cancel_never_unwinds_a_step_that_may_have_reached_its_agent() {
    let env = env().await;
    *env.app.unanswered.lock().unwrap() = (4, CUT_OFF);
    let exec = executor(&env, "");
    let (op, saga) = start(&env, &exec).await;
    while !env.app.runs.lock().unwrap().contains(&"b?") {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(exec.cancel(op));
    // b is asked until its agent answers; past b there is nothing to
    // cancel (c is past the point of no return).
    assert_eq!(
        settle(&env, op, saga).await,
        (OperationState::Succeeded, SagaState::Done)
    );
    assert_eq!(resources(&env, saga), ["a", "b", "c", "d"]);
}

#[tokio::test]
async fn a_busy_agent_is_asked_again() {
    // Busy (RESOURCE_EXHAUSTED with a RetryInfo): asked again.
    let env = env().await;
    *env.app.busy.lock().unwrap() = 2;
    let exec = executor(&env, "");
    let (op, saga) = start(&env, &exec).await;
    assert_eq!(
        settle(&env, op, saga).await,
        (OperationState::Succeeded, SagaState::Done)
    );
    let runs = env.app.runs.lock().unwrap().clone();
    assert_eq!(runs, ["a", "b~", "b~", "b", "c", "d"]);
}

/// Local nodes (whose log events go with the next commit) unwind, resume
/// and complete as any other: an error at any reversible node leaves
/// nothing (the undo of a local node that ran runs too), a crash before or
/// after any node resumes to the end.
#[tokio::test]
async fn local_nodes_unwind_and_resume_like_any_other() {
    for local in [
        &["a"][..],
        &["a", "b"],
        &["b", "c"],
        &["c", "d"],
        &["a", "b", "c", "d"],
    ] {
        for node in ["a", "b"] {
            let env = env().await;
            let exec = executor_with_local(&env, &format!("toy.{node}=error"), local);
            let (op, saga) = start(&env, &exec).await;
            assert_eq!(
                settle(&env, op, saga).await,
                (OperationState::Failed, SagaState::Done),
                "{local:?} error at {node}"
            );
            assert!(
                resources(&env, saga).is_empty(),
                "{local:?} error at {node} left {:?}",
                resources(&env, saga)
            );
        }
        for node in NODES {
            for point in ["halt", "halt_after"] {
                let env = env().await;
                let first = executor_with_local(&env, &format!("toy.{node}={point}"), local);
                let (op, saga) = start(&env, &first).await;
                stopped(&first, op).await;
                let second = executor_with_local(&env, "", local);
                assert_eq!(second.recover().await.unwrap(), 1, "{local:?} {node} {point}");
                assert_eq!(
                    settle(&env, op, saga).await,
                    (OperationState::Succeeded, SagaState::Done),
                    "{local:?} {node} {point}"
                );
                assert_eq!(
                    resources(&env, saga),
                    ["a", "b", "c", "d"],
                    "{local:?} {node} {point}"
                );
                let events = env.db.saga_node_events(saga).await.unwrap();
                for i in 0..4 {
                    for t in [SagaNodeEventType::Started, SagaNodeEventType::Succeeded] {
                        assert!(
                            events.iter().any(|e| e.node_id == i && e.event_type == t),
                            "{local:?} {node} {point}: node {i} has no {t} event: {events:?}"
                        );
                    }
                }
            }
        }
    }
}

/// The events of local nodes are committed with the next node's start: while
/// the local b runs, nothing of a's or b's is in the log; then one commit (one
/// created_at) holds a's and b's start and success and c's start.
#[tokio::test]
async fn local_nodes_are_logged_with_the_next_commit() {
    let env = env().await;
    let exec = executor_with_local(&env, "toy.c=halt", &["a", "b"]);
    let (op, saga) = start(&env, &exec).await;
    stopped(&exec, op).await;
    assert_eq!(*env.app.log_seen_by_b.lock().unwrap(), Some(0));
    let events = env.db.saga_node_events(saga).await.unwrap();
    let seen: Vec<(u32, SagaNodeEventType)> = events.iter().map(|e| (e.node_id, e.event_type)).collect();
    assert_eq!(
        seen,
        [
            (0, SagaNodeEventType::Started),
            (0, SagaNodeEventType::Succeeded),
            (1, SagaNodeEventType::Started),
            (1, SagaNodeEventType::Succeeded),
            (2, SagaNodeEventType::Started),
        ]
    );
    assert!(
        events.iter().all(|e| e.created_at == events[0].created_at),
        "{events:?}"
    );
    assert_eq!(events[1].data, Some(json!({ "made": "a" })));
}

/// A node local only for some parameters (`Node::local_if`) is local for a
/// saga whose parameters say so, and logged like any other node for the
/// rest: while b runs, the log of a saga with `quick` holds nothing; that of
/// one without holds a's start and success and b's start, as
/// `local_nodes_are_logged_with_the_next_commit` and `a_saga_runs_to_the_end` say.
#[tokio::test]
async fn a_node_is_local_for_the_parameters_that_say_so() {
    fn quick(p: &Value) -> bool {
        p.get("quick") == Some(&json!(true))
    }
    for (params, seen_by_b) in [(json!({ "quick": true }), 0), (json!({ "quick": false }), 3)] {
        let env = env().await;
        let mut def = toy_with_local(&[]);
        for n in def.nodes.iter_mut().take(2) {
            n.local_if = Some(quick);
        }
        let exec = Executor::new(
            env.db.clone(),
            env.app.clone(),
            vec![def],
            Failpoints::parse("toy.c=halt"),
            Arc::new(|_, _| {}),
        );
        let (op, _) = start_with(&env, &exec, params.clone()).await;
        stopped(&exec, op).await;
        assert_eq!(
            *env.app.log_seen_by_b.lock().unwrap(),
            Some(seen_by_b),
            "{params}"
        );
    }
}

/// Waits until the executor no longer runs the operation's saga (halted).
async fn stopped(exec: &Arc<Executor<Toy>>, op: Uuid) {
    for _ in 0..400 {
        if !exec.is_running(op) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the saga of operation {op} still runs");
}

fn x(cx: &SagaCx<Toy>) -> BoxFuture<'_, Result<Value, Status>> {
    async move { make(cx, "x") }.boxed()
}
fn x_undo(cx: &SagaCx<Toy>) -> BoxFuture<'_, Result<(), Status>> {
    async move { remove(cx, "x") }.boxed()
}

/// The toy saga as another release defines it: `order` names its nodes,
/// "x" being a node the first release does not have.
fn toy_release(order: &[&'static str]) -> SagaDef<Toy> {
    let v1 = toy_with_local(&[]);
    let nodes = order
        .iter()
        .map(|name| match v1.nodes.iter().find(|n| n.name == *name) {
            Some(n) => Node {
                name: n.name,
                forward: n.forward.clone(),
                undo: n.undo,
                local: n.local,
                local_if: n.local_if,
            },
            None => Node::new(Output::new("x"), x).undo(x_undo),
        })
        .collect();
    SagaDef {
        name: "toy",
        nodes,
        result_node: Some("b"),
    }
}

fn executor_of(env: &Env, def: SagaDef<Toy>) -> Arc<Executor<Toy>> {
    Executor::new(
        env.db.clone(),
        env.app.clone(),
        vec![def],
        Failpoints::default(),
        Arc::new(|_, _| {}),
    )
}

/// A saga stopped by a crash, then resumed by a release whose definition
/// changed: its log is matched by node names, never by position. A node
/// added after the point the saga reached runs; a node added before it,
/// or a logged node the release no longer has, parks the saga (it keeps
/// what it did, the operation says why) until a release that fits resumes
/// it.
#[tokio::test]
async fn a_changed_saga_definition_resumes_by_node_names_or_parks_the_saga() {
    // Gains a node after the point reached (the crash is after a ran).
    let env = crate::env().await;
    let first = executor(&env, "toy.a=halt_after");
    let (op, saga) = start(&env, &first).await;
    stopped(&first, op).await;
    let later = executor_of(&env, toy_release(&["a", "b", "x", "c", "d"]));
    assert_eq!(later.recover().await.unwrap(), 1);
    assert_eq!(
        settle(&env, op, saga).await,
        (OperationState::Succeeded, SagaState::Done)
    );
    assert_eq!(resources(&env, saga), ["a", "b", "c", "d", "x"]);
    let log: Vec<(u32, String)> = env
        .db
        .saga_node_events(saga)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.event_type == SagaNodeEventType::Succeeded)
        .map(|e| (e.node_id, e.node_name.clone().unwrap()))
        .collect();
    let expected: Vec<(u32, String)> = ["a", "b", "x", "c", "d"]
        .iter()
        .enumerate()
        .map(|(i, n)| (i as u32, n.to_string()))
        .collect();
    assert_eq!(log, expected);

    // Gains a node before the point reached (the crash is at c, after a
    // and b): parked, with nothing run or undone.
    let env = crate::env().await;
    let first = executor(&env, "toy.c=halt");
    let (op, saga) = start(&env, &first).await;
    stopped(&first, op).await;
    let runs_before = env.app.runs.lock().unwrap().len();
    let later = executor_of(&env, toy_release(&["a", "x", "b", "c", "d"]));
    assert_eq!(later.recover().await.unwrap(), 1);
    let why = parked(&env, saga).await;
    stopped(&later, op).await;
    assert_eq!(env.db.get_saga(saga).await.unwrap().state, SagaState::Running);
    assert!(why.contains("\"x\"") && why.contains("\"b\""), "{why}");
    let o = env.db.get_operation(op).await.unwrap();
    assert_eq!(o.state, OperationState::Running);
    assert_eq!(o.warnings, vec![why.clone()]);
    assert_eq!(env.app.runs.lock().unwrap().len(), runs_before, "nothing ran");
    assert_eq!(resources(&env, saga), ["a", "b"], "nothing undone");
    // Another start of the same release: parked again, one warning.
    env.db
        .set_saga_parked(saga, env.db.get_saga(saga).await.unwrap().generation, None)
        .await
        .unwrap();
    let again = executor_of(&env, toy_release(&["a", "x", "b", "c", "d"]));
    assert_eq!(again.recover().await.unwrap(), 1);
    assert_eq!(parked(&env, saga).await, why);
    stopped(&again, op).await;
    assert_eq!(env.db.get_operation(op).await.unwrap().warnings.len(), 1);
    // The release that began it (a roll-back) resumes it.
    let back = executor(&env, "");
    assert_eq!(back.recover().await.unwrap(), 1);
    assert_eq!(
        settle(&env, op, saga).await,
        (OperationState::Succeeded, SagaState::Done)
    );
    assert_eq!(resources(&env, saga), ["a", "b", "c", "d"]);
    assert_eq!(env.db.get_saga(saga).await.unwrap().parked, None);

    // Loses a node the log names, or reorders two: parked.
    for (order, expect) in [
        (&["a", "c", "d"][..], "no longer has"),
        (&["b", "a", "c", "d"][..], "other order"),
    ] {
        let env = crate::env().await;
        let first = executor(&env, "toy.c=halt");
        let (op, saga) = start(&env, &first).await;
        stopped(&first, op).await;
        let later = executor_of(&env, toy_release(order));
        later.recover().await.unwrap();
        let why = parked(&env, saga).await;
        stopped(&later, op).await;
        assert!(why.contains(expect), "{order:?}: {why}");
        assert_eq!(resources(&env, saga), ["a", "b"], "{order:?}");
    }

    // A release without the saga at all: parked too.
    let env = crate::env().await;
    let first = executor(&env, "toy.c=halt");
    let (op, saga) = start(&env, &first).await;
    stopped(&first, op).await;
    let mut other = toy_release(&["a", "b", "c", "d"]);
    other.name = "other";
    let later = executor_of(&env, other);
    assert_eq!(later.recover().await.unwrap(), 1);
    let why = parked(&env, saga).await;
    assert!(why.contains("no saga named \"toy\""), "{why}");
    assert_eq!(resources(&env, saga), ["a", "b"]);

    // A log from before node names (read by position) still resumes.
    let env = crate::env().await;
    let first = executor(&env, "toy.c=halt");
    let (op, saga) = start(&env, &first).await;
    stopped(&first, op).await;
    sqlx::query("UPDATE saga_node_events SET node_name = NULL")
        .execute(env.db.pool())
        .await
        .unwrap();
    let later = executor(&env, "");
    later.recover().await.unwrap();
    assert_eq!(
        settle(&env, op, saga).await,
        (OperationState::Succeeded, SagaState::Done)
    );
    assert_eq!(resources(&env, saga), ["a", "b", "c", "d"]);
    let named = env.db.saga_node_events(saga).await.unwrap();
    assert!(
        named.iter().any(|e| e.node_name.as_deref() == Some("d")),
        "new events are named: {named:?}"
    );
}

/// Waits until the saga is parked; returns why.
async fn parked(env: &Env, saga: Uuid) -> String {
    for _ in 0..400 {
        if let Some(why) = env.db.get_saga(saga).await.unwrap().parked {
            return why;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("saga {saga} was not parked");
}

/// A scratch PostgreSQL database for replica tests, dropped at the end.
struct PgEnv {
    env: Env,
    server: String,
    name: String,
}

async fn pg_env() -> PgEnv {
    let server = std::env::var("RAMSNAP_TEST_PG_URL").unwrap_or_else(|_| {
        panic!(
            "RAMSNAP_TEST_PG_URL is not set, so this PostgreSQL test cannot run. Start PostgreSQL \
             with `bash scripts/setup/postgres.sh` and set \
             RAMSNAP_TEST_PG_URL=postgres://ramsnap:ramsnap@127.0.0.1:5432/ramsnap"
        )
    });
    let name = format!("rs_replicas_{}", Uuid::new_v4().simple());
    let admin = Database::connect(&server).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(admin.pool())
        .await
        .unwrap();
    admin.close().await;
    let (base, _) = server.rsplit_once('/').unwrap();
    let db = Database::connect(&format!("{base}/{name}")).await.unwrap();
    db.migrate().await.unwrap();
    PgEnv {
        env: Env {
            _dir: tempfile::tempdir().unwrap(),
            db,
            app: Arc::new(Toy::default()),
        },
        server,
        name,
    }
}

impl PgEnv {
    async fn drop_database(self) {
        self.env.db.close().await;
        let admin = Database::connect(&self.server).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(admin.pool())
        .await
        .unwrap();
        admin.close().await;
    }
}

/// Replicas on one PostgreSQL database (issue 11): a saga whose owner
/// holds no live lease is adopted by a live replica, with a new generation,
/// and completed there; the old owner, still running it (a replica frozen
/// past its lease, then thawed), is refused every write to the saga's log
/// from then on and gives the saga up. Exactly one success per node is
/// logged, and the operation ends once.
#[tokio::test]
async fn a_live_replica_adopts_the_sagas_of_one_whose_lease_ran_out_and_fences_it() {
    let pg = pg_env().await;
    let env = &pg.env;
    let release = env._dir.path().join("toy.c");
    std::env::set_var("RAMSNAP_FAILPOINT_DIR", env._dir.path());

    // A: registered with a long lease (its heartbeat renews it every 20 s),
    // runs a saga that waits at c.
    let a = executor(env, "toy.c=hold");
    a.set_lease(Duration::from_secs(60));
    assert_eq!(a.recover().await.unwrap(), 0);
    let (op, saga) = start(env, &a).await;
    for _ in 0..400 {
        let log = env.db.saga_node_events(saga).await.unwrap();
        if log.iter().any(|e| e.node_name.as_deref() == Some("c")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // B: a second replica with a short lease; while A's lease runs, B
    // leaves A's saga alone.
    let b = executor(env, "");
    b.set_lease(Duration::from_millis(300));
    assert_eq!(b.recover().await.unwrap(), 0);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let s = env.db.get_saga(saga).await.unwrap();
    assert_eq!((s.owner.clone(), s.generation), (a.replica_id().to_string(), 0));
    let replicas = env.db.replicas().await.unwrap();
    assert_eq!(replicas.len(), 2);
    assert!(replicas.iter().all(|r| r.live), "{replicas:?}");

    // A stops answering: its lease ends (as if frozen past it). Within a
    // heartbeat of B (100 ms), B adopts the saga and completes it.
    env.db.expire_lease(a.replica_id()).await.unwrap();
    let adopted_at = std::time::Instant::now();
    assert_eq!(
        settle(env, op, saga).await,
        (OperationState::Succeeded, SagaState::Done)
    );
    assert!(
        adopted_at.elapsed() < Duration::from_secs(3),
        "{:?}",
        adopted_at.elapsed()
    );
    let s = env.db.get_saga(saga).await.unwrap();
    assert_eq!((s.owner.clone(), s.generation), (b.replica_id().to_string(), 1));
    assert_eq!(resources(env, saga), ["a", "b", "c", "d"]);

    // A thaws: it runs c and writes c's success, which is refused; it
    // stops the saga and writes nothing more.
    let log_before = env.db.saga_node_events(saga).await.unwrap();
    std::fs::write(&release, b"").unwrap();
    stopped(&a, op).await;
    let log_after = env.db.saga_node_events(saga).await.unwrap();
    assert_eq!(log_after, log_before, "the stale replica wrote nothing");
    for node in NODES {
        let successes = log_after
            .iter()
            .filter(|e| e.node_name.as_deref() == Some(node) && e.event_type == SagaNodeEventType::Succeeded)
            .count();
        assert_eq!(successes, 1, "{node}: {log_after:?}");
    }
    let o = env.db.get_operation(op).await.unwrap();
    assert_eq!(o.state, OperationState::Succeeded);
    // A ran c (its write came after), and nothing after it: d ran once, on B.
    let runs = env.app.runs.lock().unwrap().clone();
    let count = |n: &str| runs.iter().filter(|r| **r == n).count();
    assert_eq!((count("c"), count("d")), (2, 1), "{runs:?}");
    // A's next heartbeat renews its lease: it is a live replica again,
    // with nothing to run.
    pg.drop_database().await;
}
