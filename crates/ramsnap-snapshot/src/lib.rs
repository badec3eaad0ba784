//! SnapshotService: the coordinator. It keeps clusters, VMs and snapshots in
//! its database ([`db`]) and changes them through durable sagas ([`saga`],
//! [`sagas`]) that drive each host's StorageService and HostService over
//! gRPC ([`app`]).

pub mod app;
pub mod convert;
pub mod db;
pub mod ovf;
pub mod saga;
pub mod sagas;
pub mod service;
pub mod status;

use app::App;
use ramsnap_common::limits::MessageLimits;
use ramsnap_common::server::ServiceSet;
use ramsnap_common::tls::ClientTransport;
use ramsnap_proto::snapshot::v1::{
    cluster_service_server::ClusterServiceServer, operation_service_server::OperationServiceServer,
    snapshot_service_server::SnapshotServiceServer, vm_service_server::VmServiceServer,
};
use std::sync::Arc;

/// The coordinator, ready to serve: database open and migrated, sagas left
/// unfinished by an earlier process resumed, VM status streams followed.
pub struct Coordinator {
    pub app: Arc<App>,
}

impl Coordinator {
    /// [`Coordinator::connect`], then [`Coordinator::resume`] at once: for a
    /// coordinator whose agents run elsewhere.
    pub async fn open(database_url: &str) -> anyhow::Result<Coordinator> {
        let c = Coordinator::connect(database_url).await?;
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
        if let Some(path) = database_url.strip_prefix("sqlite:") {
            let path = path.trim_start_matches("//");
            if let Some(dir) = std::path::Path::new(path).parent() {
                if !dir.as_os_str().is_empty() {
                    std::fs::create_dir_all(dir)?;
                }
            }
        }
        let db = db::Database::connect(database_url).await?;
        db.migrate().await?;
        tracing::info!(backend = ?db.backend(), "database ready");
        let app = App::with_transport(db.clone(), transport);
        let notify_app = Arc::downgrade(&app);
        let exec = saga::Executor::new(
            db,
            app.clone(),
            sagas::all(),
            saga::Failpoints::from_env(),
            Arc::new(move |op| {
                if let Some(app) = notify_app.upgrade() {
                    app.notify_operation(op);
                }
            }),
        );
        app.set_executor(exec);
        Ok(Coordinator { app })
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
        Ok(())
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

    pub async fn close(&self) {
        self.app.db.close().await;
    }
}
