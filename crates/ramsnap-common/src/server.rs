//! One way to run a ramsnap gRPC server: the service's routes plus gRPC
//! reflection (v1 and v1alpha, for old and new grpcurl) and grpc.health.v1,
//! request spans through `tracing`, and a graceful stop on SIGTERM/SIGINT.
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::Routes;
use tonic_health::ServingStatus;

/// What a service hands to [`serve`]: its gRPC services and the names the
/// health service reports for them.
pub struct ServiceSet {
    /// Fully qualified gRPC service names to report in the health service.
    pub health_names: Vec<&'static str>,
    add: Box<dyn FnOnce(Routes) -> Routes + Send>,
}

impl ServiceSet {
    /// One tonic service, reported in health as `name`.
    pub fn new<S>(name: &'static str, svc: S) -> ServiceSet
    where
        S: tower_service::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        ServiceSet {
            health_names: vec![name],
            add: Box::new(move |routes| routes.add_service(svc)),
        }
    }

    /// Adds another service to the set.
    pub fn with<S>(self, name: &'static str, svc: S) -> ServiceSet
    where
        S: tower_service::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        let ServiceSet {
            mut health_names,
            add,
        } = self;
        health_names.push(name);
        ServiceSet {
            health_names,
            add: Box::new(move |routes| add(routes).add_service(svc)),
        }
    }
}

/// Binds `addr` and prints one JSON line on stdout once listening, so that a
/// supervisor or a test learns the bound port (useful with port 0).
pub async fn bind(name: &str, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    println!(
        "{}",
        serde_json::json!({"event": "listening", "service": name, "addr": local.to_string()})
    );
    tracing::info!(service = name, %local, "listening");
    Ok(listener)
}

/// Serves the sets on one listener until `shutdown` resolves, then stops
/// taking requests, reports NOT_SERVING, and lets in-flight calls finish.
pub async fn serve(
    listener: TcpListener,
    sets: Vec<ServiceSet>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let names: Vec<&'static str> = sets.iter().flat_map(|s| s.health_names.iter().copied()).collect();
    // Reflection lists only what this server serves (every ramsnap proto is
    // in the one descriptor set), plus health and reflection itself.
    let reflection = |own: &str| {
        let mut b = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(ramsnap_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health")
            .with_service_name(own);
        for name in &names {
            b = b.with_service_name(*name);
        }
        b
    };
    let reflection_v1 = reflection("grpc.reflection.v1.ServerReflection").build_v1()?;
    let reflection_v1alpha = reflection("grpc.reflection.v1alpha.ServerReflection").build_v1alpha()?;

    let mut routes = Routes::new(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    for set in sets {
        routes = (set.add)(routes);
    }
    for name in &names {
        reporter.set_service_status(*name, ServingStatus::Serving).await;
    }

    let stop_reporter = reporter.clone();
    let shutdown = async move {
        shutdown.await;
        tracing::info!("shutting down: draining in-flight calls");
        stop_reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
        for name in names {
            stop_reporter
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
    };

    tonic::transport::Server::builder()
        .trace_fn(|req| tracing::info_span!("grpc", path = %req.uri().path()))
        .add_routes(routes)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
