//! The coordinator's shared state: the database, gRPC clients for each
//! host's HostService and StorageService, the saga executor, and the
//! channels that wake watchers of operations and VMs.
use crate::db::{self, Database, DbError};
use crate::saga::Executor;
use ramsnap_common::tls::ClientTransport;
use ramsnap_common::{fence, status};
use ramsnap_proto::host::v1::host_service_client::HostServiceClient;
use ramsnap_proto::storage::v1::storage_service_client::StorageServiceClient;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::broadcast;
use tonic::codegen::InterceptedService;
use tonic::transport::Channel;
use tonic::Status;
use uuid::Uuid;

/// The channel to an agent: stamped with the fence of the saga node that
/// calls (see [`ramsnap_common::fence`]).
pub type AgentChannel = InterceptedService<Channel, fence::Stamp>;

pub struct App {
    pub db: Database,
    /// How the coordinator reaches the agents (TLS with its certificate).
    transport: ClientTransport,
    channels: Mutex<HashMap<String, Channel>>,
    executor: OnceLock<Arc<Executor<App>>>,
    /// An operation changed.
    pub operation_events: broadcast::Sender<OperationEvent>,
    /// A VM's status changed (its id).
    pub vm_events: broadcast::Sender<Uuid>,
    /// VMs whose host status stream is being followed.
    pub(crate) followed: Mutex<HashMap<Uuid, tokio::task::JoinHandle<()>>>,
    /// The other replicas on PostgreSQL (see [`crate::peers`]).
    peers: OnceLock<Arc<crate::peers::Peers>>,
    /// How often WatchOperation re-reads an operation that no event woke
    /// it for (progress, changes of replicas it did not hear of).
    pub(crate) watch_backstop: std::time::Duration,
}

/// [`App::watch_backstop`] by default.
pub const WATCH_BACKSTOP: std::time::Duration = std::time::Duration::from_millis(500);

impl App {
    /// An App that reaches the agents in plain text (in-process tests).
    pub fn new(db: Database) -> Arc<App> {
        App::with_transport(db, ClientTransport::Insecure)
    }

    pub fn with_transport(db: Database, transport: ClientTransport) -> Arc<App> {
        App::with_options(db, transport, WATCH_BACKSTOP)
    }

    pub(crate) fn with_options(
        db: Database,
        transport: ClientTransport,
        watch_backstop: std::time::Duration,
    ) -> Arc<App> {
        Arc::new(App {
            db,
            transport,
            channels: Mutex::new(HashMap::new()),
            executor: OnceLock::new(),
            operation_events: broadcast::channel(1024).0,
            vm_events: broadcast::channel(1024).0,
            followed: Mutex::new(HashMap::new()),
            peers: OnceLock::new(),
            watch_backstop,
        })
    }

    pub(crate) fn set_peers(&self, peers: Arc<crate::peers::Peers>) {
        let _ = self.peers.set(peers);
    }

    pub fn set_executor(&self, exec: Arc<Executor<App>>) {
        let _ = self.executor.set(exec);
    }

    pub fn executor(&self) -> &Arc<Executor<App>> {
        self.executor.get().expect("executor is set at start-up")
    }

    fn channel(&self, address: &str) -> Result<Channel, Status> {
        let mut map = self.channels.lock().expect("poisoned");
        if let Some(c) = map.get(address) {
            return Ok(c.clone());
        }
        let endpoint = self
            .transport
            .endpoint(address)
            .map_err(|e| status::invalid_argument("address", format!("{address}: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_keepalive(Some(Duration::from_secs(30)))
            .http2_keep_alive_interval(Duration::from_secs(30));
        let channel = self.transport.connect_lazy(&endpoint);
        map.insert(address.to_string(), channel.clone());
        Ok(channel)
    }

    pub async fn host(&self, host_id: Uuid) -> Result<db::Host, Status> {
        self.db.get_host(host_id).await.map_err(db_status)
    }

    /// A host agent's client. Calls made from a saga node carry the saga's
    /// id and generation, which the agent fences on (see
    /// [`ramsnap_common::fence`]).
    pub fn host_client(&self, host: &db::Host) -> Result<HostServiceClient<AgentChannel>, Status> {
        Ok(
            HostServiceClient::with_interceptor(self.channel(&host.host_address)?, fence::Stamp::default())
                .max_decoding_message_size(64 << 20),
        )
    }

    /// A storage agent's client, fenced as [`App::host_client`], for
    /// reads and for what stays on the host (prepare, teardown); metadata
    /// changes go through [`App::on_domain_writer`].
    pub fn storage_client(&self, host: &db::Host) -> Result<StorageServiceClient<AgentChannel>, Status> {
        self.storage_client_stamped(host, fence::Stamp::default())
    }

    pub(crate) fn storage_client_stamped(
        &self,
        host: &db::Host,
        stamp: fence::Stamp,
    ) -> Result<StorageServiceClient<AgentChannel>, Status> {
        // VM descriptors (OVF) may be up to 16 MiB each.
        Ok(
            StorageServiceClient::with_interceptor(self.channel(&host.storage_address)?, stamp)
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
        )
    }

    /// The cluster's first host, through which its storage is reached;
    /// FAILED_PRECONDITION NO_HOST when it has none.
    pub async fn cluster_host(&self, cluster_id: Uuid) -> Result<db::Host, Status> {
        self.db
            .first_host_in_cluster(cluster_id)
            .await
            .map_err(db_status)?
            .ok_or_else(|| {
                status::failed_precondition(
                    "NO_HOST",
                    &format!("cluster/{cluster_id}"),
                    format!("cluster {cluster_id} has no host; add one with ClusterService.AddHost"),
                )
            })
    }

    /// The host a VM runs on, or would run on: its own, else its cluster's first.
    pub async fn host_for_vm(&self, vm: &db::Vm) -> Result<db::Host, Status> {
        if let Some(h) = vm.host_id {
            if let Ok(host) = self.db.host_cached(h).await {
                return Ok(host);
            }
        }
        self.cluster_host(vm.cluster_id).await
    }

    /// The operation changed: its watchers here and on the other replicas
    /// read it again, or, when `now` is given (the operation as the change
    /// left it, read back by the write that made it), watchers here take
    /// that.
    pub fn notify_operation(&self, id: Uuid, now: Option<db::Operation>) {
        let _ = self.operation_events.send(OperationEvent {
            id,
            now: now.map(Arc::new),
        });
        if let Some(p) = self.peers.get() {
            p.publish("op", id);
        }
    }

    /// The VM changed (see [`App::notify_operation`]).
    pub fn notify_vm(&self, id: Uuid) {
        self.wake_vm_watchers(id);
        if let Some(p) = self.peers.get() {
            p.publish("vm", id);
        }
    }

    pub(crate) fn wake_operation_watchers(&self, id: Uuid) {
        let _ = self.operation_events.send(OperationEvent { id, now: None });
    }

    pub(crate) fn wake_vm_watchers(&self, id: Uuid) {
        let _ = self.vm_events.send(id);
    }
}

/// An operation changed: its id, and the operation as it now is when the
/// one who changed it has it (see [`App::notify_operation`]).
#[derive(Clone, Debug)]
pub struct OperationEvent {
    pub id: Uuid,
    pub now: Option<Arc<db::Operation>>,
}

/// [`changed`] for an operation: the operation as the change left it
/// when its event carries it (else the watcher reads it).
pub async fn operation_changed(
    events: &mut broadcast::Receiver<OperationEvent>,
    id: Uuid,
    backstop: std::time::Duration,
) -> Option<Arc<db::Operation>> {
    changed(events, |e| e.id == id, backstop)
        .await
        .and_then(|e| e.now)
}

/// Waits until an event of `events` is about the watched object (`about`),
/// or missed events (it lagged), or the backstop passes; the event, when
/// one came. A watch re-reads its object then (unless the event carries
/// it): with many watchers, each must not re-read on every other object's
/// change.
pub async fn changed<E: Clone>(
    events: &mut broadcast::Receiver<E>,
    about: impl Fn(&E) -> bool,
    backstop: std::time::Duration,
) -> Option<E> {
    let wait = async {
        loop {
            match events.recv().await {
                Ok(e) if about(&e) => return Some(e),
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(_)) => return None,
                // No more events (shutting down): the backstop alone.
                Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
            }
        }
    };
    tokio::time::timeout(backstop, wait).await.ok().flatten()
}

/// Database errors as gRPC statuses.
pub fn db_status(e: DbError) -> Status {
    match e {
        DbError::NotFound { kind, id } => status::not_found(kind, &id),
        DbError::Conflict { kind, id, message } => status::already_exists(kind, &id, message),
        DbError::ForeignKey { kind, id, message } => {
            status::failed_precondition("REFERENCE", &format!("{kind}/{id}"), message)
        }
        DbError::VmLocked { vm_id, holder } => vm_locked(vm_id, holder),
        DbError::StaleOwner { saga, .. } => status::failed_precondition(
            "STALE_OWNER",
            &format!("saga/{saga}"),
            format!("saga {saga} is owned by another coordinator now"),
        ),
        DbError::InvalidValue { field, message } => status::invalid_argument(field, message),
        DbError::Refused {
            kind,
            subject,
            message,
        } => status::failed_precondition(kind, &subject, message),
        e @ (DbError::Migrate(_) | DbError::Sqlx(_)) => Status::unavailable(format!("database: {e}")),
    }
}

pub fn vm_locked(vm_id: Uuid, holder: Uuid) -> Status {
    status::failed_precondition(
        "VM_LOCKED",
        &format!("vm/{vm_id}"),
        format!("VM {vm_id} is locked by operation {holder}; wait for it to finish or cancel it"),
    )
}
