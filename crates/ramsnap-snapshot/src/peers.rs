//! Changes pushed between coordinator replicas on PostgreSQL: LISTEN/NOTIFY
//! on one channel, each payload naming the sending replica and the objects
//! that changed ("<replica> op:<id>,vm:<id>,..."), never their content:
//! what is queued when the publisher comes round goes in one notification. A
//! replica that hears of an object wakes its own watchers of it (they read
//! it again); for an operation it runs whose cancel was asked of another
//! replica, it cancels it. A notification can be lost (a reconnection):
//! watchers keep their database poll as the backstop. Nothing is sent while
//! no other replica holds a live lease.
use crate::app::App;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::mpsc;
use uuid::Uuid;

pub const CHANNEL: &str = "ramsnap_changes";
/// How often a replica looks whether others are live.
const PEER_CHECK: Duration = Duration::from_secs(1);

/// Most bytes of object names in one notification (PostgreSQL takes
/// payloads under 8000 bytes).
const MAX_PAYLOAD: usize = 7000;

pub struct Peers {
    me: Uuid,
    /// Changed objects, "op:<id>" or "vm:<id>".
    tx: mpsc::UnboundedSender<String>,
    /// Whether another replica holds a live lease (checked every
    /// [`PEER_CHECK`]).
    others: AtomicBool,
}

impl Peers {
    /// Tells the other replicas that the operation (`kind` "op") or VM
    /// ("vm") `id` changed.
    pub fn publish(&self, kind: &str, id: Uuid) {
        if self.others.load(Ordering::Relaxed) {
            let _ = self.tx.send(format!("{kind}:{id}"));
        }
    }
}

/// Starts the publisher, the listener and the peer check of replica `me`
/// on the PostgreSQL database at `url`.
pub fn start(app: &Arc<App>, url: &str, me: Uuid) -> Arc<Peers> {
    let (tx, rx) = mpsc::unbounded_channel();
    let peers = Arc::new(Peers {
        me,
        tx,
        others: AtomicBool::new(false),
    });
    tokio::spawn(publish(Arc::downgrade(app), me, rx));
    tokio::spawn(listen(Arc::downgrade(app), url.to_string(), me));
    let (weak_app, weak_peers) = (Arc::downgrade(app), Arc::downgrade(&peers));
    tokio::spawn(async move {
        loop {
            let (Some(app), Some(peers)) = (weak_app.upgrade(), weak_peers.upgrade()) else {
                return;
            };
            if let Ok(all) = app.db.replicas().await {
                let others = all.iter().any(|r| r.live && r.id != peers.me);
                peers.others.store(others, Ordering::Relaxed);
            }
            drop((app, peers));
            tokio::time::sleep(PEER_CHECK).await;
        }
    });
    peers
}

/// Sends what is queued, each object once per round, in as few
/// notifications as fit.
async fn publish(app: Weak<App>, me: Uuid, mut rx: mpsc::UnboundedReceiver<String>) {
    while let Some(first) = rx.recv().await {
        let mut batch = BTreeSet::from([first]);
        while let Ok(more) = rx.try_recv() {
            batch.insert(more);
        }
        let Some(app) = app.upgrade() else { return };
        let mut payloads: Vec<String> = Vec::new();
        for object in batch {
            match payloads.last_mut() {
                Some(p) if p.len() + object.len() < MAX_PAYLOAD => {
                    p.push(',');
                    p.push_str(&object);
                }
                _ => payloads.push(format!("{me} {object}")),
            }
        }
        for payload in payloads {
            if let Err(e) = sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CHANNEL)
                .bind(&payload)
                .execute(app.db.pool())
                .await
            {
                tracing::debug!(error = %e, "notifying the other replicas failed (they poll)");
            }
        }
    }
}

/// Hears the other replicas, reconnecting as needed.
async fn listen(app: Weak<App>, url: String, me: Uuid) {
    loop {
        let mut listener = match sqlx::postgres::PgListener::connect(&url).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "listening to the other replicas failed; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(e) = listener.listen(CHANNEL).await {
            tracing::warn!(error = %e, "listening to the other replicas failed; trying again");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        loop {
            let note = match listener.recv().await {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "lost the other replicas' notifications; listening again");
                    break;
                }
            };
            let Some(app) = app.upgrade() else { return };
            heard(&app, me, note.payload());
        }
    }
}

fn heard(app: &Arc<App>, me: Uuid, payload: &str) {
    let Some((from, objects)) = payload.split_once(' ') else {
        return;
    };
    if Uuid::parse_str(from).ok() == Some(me) {
        return;
    }
    for object in objects.split(',') {
        heard_of(app, object);
    }
}

fn heard_of(app: &Arc<App>, object: &str) {
    let Some((kind, id)) = object.split_once(':') else {
        return;
    };
    let Ok(id) = Uuid::parse_str(id) else { return };
    match kind {
        "op" => {
            app.wake_operation_watchers(id);
            if app.executor().is_running(id) {
                // Asked of another replica: cancel it here, where it runs.
                let app = app.clone();
                tokio::spawn(async move {
                    if let Ok(op) = app.db.get_operation(id).await {
                        if op.cancel_requested && !op.state.is_terminal() && app.executor().cancel(id) {
                            tracing::info!(operation = %id, "cancel asked of another replica");
                        }
                    }
                });
            }
        }
        "vm" => app.wake_vm_watchers(id),
        _ => {}
    }
}
