//! The security machinery over real TLS on real TCP (127.0.0.1:0) with a
//! real tonic server: health, plus stub ClusterService and OperationService
//! handlers that answer with the caller's identity.
use ramsnap_common::audit;
use ramsnap_common::authn::{Bearer, Identity, TokenTable};
use ramsnap_common::authz::{spiffe, AuthLayer, AuthMode, Policy};
use ramsnap_common::devcerts::{ensure_dev_certs, DevCerts};
use ramsnap_common::limits::{Limits, LimitsLayer, MessageLimits};
use ramsnap_common::reload::Reloadable;
use ramsnap_common::tls::{ClientAuth, ClientTls, ClientTransport, ServerTls, ServerTransport, TlsFiles};
use ramsnap_proto::snapshot::v1 as pb;
use ramsnap_proto::snapshot::v1::cluster_service_client::ClusterServiceClient;
use ramsnap_proto::snapshot::v1::cluster_service_server::{ClusterService, ClusterServiceServer};
use ramsnap_proto::snapshot::v1::operation_service_client::OperationServiceClient;
use ramsnap_proto::snapshot::v1::operation_service_server::{OperationService, OperationServiceServer};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Notify, Semaphore};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_types::StatusExt;

const POLL: Duration = Duration::from_millis(50);
const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- stubs

/// Gates for the limit tests: `GetCluster("block")` waits for a permit of
/// `release` after telling `entered`.
#[derive(Clone)]
struct Stub {
    entered: Arc<Notify>,
    release: Arc<Semaphore>,
}

impl Default for Stub {
    fn default() -> Self {
        Stub {
            entered: Arc::default(),
            release: Arc::new(Semaphore::new(0)),
        }
    }
}

fn caller<T>(req: &Request<T>) -> Result<String, Status> {
    Identity::of(req)
        .map(|i| i.name.clone())
        .ok_or_else(|| Status::internal("no identity in the request"))
}

fn cluster(name: String) -> Option<pb::Cluster> {
    Some(pb::Cluster {
        name,
        ..Default::default()
    })
}

#[tonic::async_trait]
impl ClusterService for Stub {
    async fn create_cluster(
        &self,
        req: Request<pb::CreateClusterRequest>,
    ) -> Result<Response<pb::CreateClusterResponse>, Status> {
        Ok(Response::new(pb::CreateClusterResponse {
            cluster: cluster(caller(&req)?),
        }))
    }

    async fn get_cluster(
        &self,
        req: Request<pb::GetClusterRequest>,
    ) -> Result<Response<pb::GetClusterResponse>, Status> {
        let who = caller(&req)?;
        let id = req.into_inner().cluster_id;
        if id == "block" {
            self.entered.notify_one();
            self.release.acquire().await.expect("open").forget();
        } else if let Some(ms) = id.strip_prefix("slow:") {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
        }
        Ok(Response::new(pb::GetClusterResponse {
            cluster: cluster(who),
        }))
    }

    async fn list_clusters(
        &self,
        _: Request<pb::ListClustersRequest>,
    ) -> Result<Response<pb::ListClustersResponse>, Status> {
        Err(Status::unimplemented("stub"))
    }

    async fn add_host(
        &self,
        _: Request<pb::AddHostRequest>,
    ) -> Result<Response<pb::AddHostResponse>, Status> {
        Err(Status::unimplemented("stub"))
    }

    async fn remove_host(
        &self,
        _: Request<pb::RemoveHostRequest>,
    ) -> Result<Response<pb::RemoveHostResponse>, Status> {
        Err(Status::unimplemented("stub"))
    }

    async fn delete_cluster(
        &self,
        _: Request<pb::DeleteClusterRequest>,
    ) -> Result<Response<pb::DeleteClusterResponse>, Status> {
        Err(Status::unimplemented("stub"))
    }

    async fn list_hosts(
        &self,
        _: Request<pb::ListHostsRequest>,
    ) -> Result<Response<pb::ListHostsResponse>, Status> {
        Err(Status::unimplemented("stub"))
    }
}

type OpStream = Pin<Box<dyn Stream<Item = Result<pb::WatchOperationResponse, Status>> + Send>>;

#[tonic::async_trait]
impl OperationService for Stub {
    async fn get_operation(
        &self,
        _: Request<pb::GetOperationRequest>,
    ) -> Result<Response<pb::GetOperationResponse>, Status> {
        Err(Status::unimplemented("stub"))
    }

    async fn list_operations(
        &self,
        _: Request<pb::ListOperationsRequest>,
    ) -> Result<Response<pb::ListOperationsResponse>, Status> {
        Err(Status::unimplemented("stub"))
    }

    type WatchOperationStream = OpStream;

    /// Three updates, `operation_id` milliseconds apart.
    async fn watch_operation(
        &self,
        req: Request<pb::WatchOperationRequest>,
    ) -> Result<Response<OpStream>, Status> {
        let gap = Duration::from_millis(req.into_inner().operation_id.parse().unwrap_or(0));
        let s = tokio_stream::iter(0..3).then(move |i| async move {
            tokio::time::sleep(gap).await;
            Ok(pb::WatchOperationResponse {
                operation: Some(pb::Operation {
                    operation_id: i.to_string(),
                    ..Default::default()
                }),
            })
        });
        Ok(Response::new(Box::pin(s)))
    }

    async fn cancel_operation(
        &self,
        req: Request<pb::CancelOperationRequest>,
    ) -> Result<Response<pb::CancelOperationResponse>, Status> {
        let who = caller(&req)?;
        let id = req.into_inner().operation_id;
        if let Some(ms) = id.strip_prefix("slow:") {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
        }
        Ok(Response::new(pb::CancelOperationResponse {
            cancelling: true,
            operation: Some(pb::Operation {
                operation_id: who,
                ..Default::default()
            }),
        }))
    }
}

// ---------------------------------------------------------------- server

struct Running {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}

async fn serve(transport: ServerTransport, auth: AuthLayer, limits: Limits, stub: Stub) -> Running {
    serve_with(
        transport,
        auth,
        limits,
        stub,
        ramsnap_common::tls::HANDSHAKE_TIMEOUT,
    )
    .await
}

async fn serve_with(
    transport: ServerTransport,
    auth: AuthLayer,
    limits: Limits,
    stub: Stub,
    handshake_timeout: Duration,
) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let router = tonic::transport::Server::builder()
        .layer(auth)
        .layer(LimitsLayer::new(limits))
        .add_service(health)
        .add_service(ClusterServiceServer::new(stub.clone()).with_message_limits())
        .add_service(OperationServiceServer::new(stub).with_message_limits());
    let (tx, rx) = oneshot::channel::<()>();
    let shutdown = async {
        let _ = rx.await;
    };
    let transport = match transport {
        ServerTransport::Tls(tls) => ServerTransport::Tls(tls.with_handshake_limits(handshake_timeout, 1024)),
        insecure => insecure,
    };
    let task = tokio::spawn(transport.serve(router, listener, shutdown));
    Running {
        addr,
        stop: Some(tx),
        task,
    }
}

fn tls_server(certs: &DevCerts, auth: ClientAuth) -> ServerTls {
    ServerTls::with_poll_interval(certs.files("coordinator"), auth, POLL).unwrap()
}

fn coordinator_auth() -> AuthLayer {
    AuthLayer::new(AuthMode::Tls, Reloadable::fixed(Policy::coordinator_default()))
}

// ---------------------------------------------------------------- clients

fn channel(transport: &ClientTransport, addr: SocketAddr) -> Channel {
    let endpoint = transport
        .endpoint(&addr.to_string())
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10));
    transport.connect_lazy(&endpoint)
}

fn client_as(files: TlsFiles, addr: SocketAddr) -> Channel {
    channel(
        &ClientTransport::Tls(ClientTls::with_poll_interval(files, POLL).unwrap()),
        addr,
    )
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    #[allow(deprecated)]
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &Path) -> Arc<rustls::RootCertStore> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    Arc::new(roots)
}

/// A client that trusts `ca` and presents no certificate.
fn client_without_cert(ca: &Path, addr: SocketAddr) -> Channel {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(ca))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    channel(&ClientTransport::Tls(ClientTls::from_config(config)), addr)
}

async fn create_cluster(ch: &Channel) -> Result<String, Status> {
    let r = ClusterServiceClient::new(ch.clone())
        .create_cluster(pb::CreateClusterRequest::default())
        .await?;
    Ok(r.into_inner().cluster.unwrap().name)
}

async fn get_cluster(ch: &Channel, id: &str) -> Result<String, Status> {
    let r = ClusterServiceClient::new(ch.clone())
        .get_cluster(pb::GetClusterRequest {
            cluster_id: id.into(),
        })
        .await?;
    Ok(r.into_inner().cluster.unwrap().name)
}

async fn cancel_operation(ch: &Channel, id: &str) -> Result<String, Status> {
    let r = OperationServiceClient::new(ch.clone())
        .cancel_operation(pb::CancelOperationRequest {
            operation_id: id.into(),
        })
        .await?;
    Ok(r.into_inner().operation.unwrap().operation_id)
}

async fn health(ch: &Channel) -> Result<(), Status> {
    HealthClient::new(ch.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|_| ())
}

/// A TLS refusal, as a tonic client sees it: UNAVAILABLE when the client's
/// own handshake fails (it distrusts the server, or TLS 1.2); with TLS 1.3,
/// the client's side of the handshake is over before the server checks the
/// client certificate, so the server's refusal arrives as a fatal alert on
/// the first read: UNKNOWN "transport error" with the alert as its source.
fn assert_refused_by_tls(r: Result<impl std::fmt::Debug, Status>) {
    let st = r.expect_err("the TLS handshake must be refused");
    let alert = format!("{st:?}").contains("received fatal alert");
    assert!(
        st.code() == Code::Unavailable || (st.code() == Code::Unknown && alert),
        "{st:?}"
    );
}

fn assert_role_required(st: &Status, required: &str, identity: &str, rpc: &str) {
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
    let info = st.get_error_details().error_info().cloned().expect("ErrorInfo");
    assert_eq!(info.reason, "ROLE_REQUIRED");
    assert_eq!(info.metadata["required_role"], required);
    assert_eq!(info.metadata["identity"], identity);
    assert_eq!(info.metadata["rpc"], rpc);
}

// ---------------------------------------------------------------- audit capture

type Events = Arc<Mutex<Vec<HashMap<String, String>>>>;

struct Capture(Events);

struct Fields<'a>(&'a mut HashMap<String, String>);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_string(), format!("{value:?}"));
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if event.metadata().target() == audit::TARGET {
            let mut fields = HashMap::new();
            event.record(&mut Fields(&mut fields));
            self.0.lock().unwrap().push(fields);
        }
    }
}

/// Audit events of this thread's tests (the tests run on a current-thread
/// runtime, so the server's tasks share the thread).
fn capture_audit() -> (Events, tracing::subscriber::DefaultGuard) {
    use tracing_subscriber::layer::SubscriberExt;
    let events = Events::default();
    let subscriber = tracing_subscriber::registry().with(Capture(events.clone()));
    (events, tracing::subscriber::set_default(subscriber))
}

fn take(events: &Events) -> Vec<HashMap<String, String>> {
    std::mem::take(&mut *events.lock().unwrap())
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn client_without_certificate_or_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let certs = ensure_dev_certs(dir.path()).unwrap();
    let other = tempfile::tempdir().unwrap();
    let other = ensure_dev_certs(other.path()).unwrap();
    let server = serve(
        ServerTransport::Tls(tls_server(&certs, ClientAuth::Required)),
        coordinator_auth(),
        Limits::default(),
        Stub::default(),
    )
    .await;

    assert_refused_by_tls(health(&client_without_cert(&certs.ca(), server.addr)).await);
    // Another CA's admin, trusting our CA for the server.
    let stranger = TlsFiles {
        ca: certs.ca(),
        ..other.files("admin")
    };
    assert_refused_by_tls(create_cluster(&client_as(stranger, server.addr)).await);
    // A client that does not trust the server's CA refuses it.
    let distrustful = TlsFiles {
        ca: other.ca(),
        ..certs.files("admin")
    };
    assert_refused_by_tls(health(&client_as(distrustful, server.addr)).await);

    // Failed handshakes cost the server nothing: it still serves.
    let admin = client_as(certs.files("admin"), server.addr);
    assert_eq!(create_cluster(&admin).await.unwrap(), spiffe::ADMIN);
    server.stop().await;
}

#[tokio::test]
async fn a_stalled_handshake_neither_blocks_accepts_nor_lasts() {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    let certs = ensure_dev_certs(dir.path()).unwrap();
    let server = serve_with(
        ServerTransport::Tls(tls_server(&certs, ClientAuth::Required)),
        coordinator_auth(),
        Limits::default(),
        Stub::default(),
        Duration::from_millis(300),
    )
    .await;
    // Connected, never says a word.
    let mut stalled = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    // Others are served meanwhile.
    let admin = client_as(certs.files("admin"), server.addr);
    assert_eq!(create_cluster(&admin).await.unwrap(), spiffe::ADMIN);
    // The server hangs up on it once the handshake time is over.
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(WAIT, stalled.read(&mut buf))
        .await
        .expect("the server must close a stalled handshake")
        .unwrap_or(0);
    assert_eq!(n, 0);
    server.stop().await;
}

#[tokio::test]
async fn roles_are_enforced_and_mutating_calls_audited() {
    let (events, _guard) = capture_audit();
    let dir = tempfile::tempdir().unwrap();
    let certs = ensure_dev_certs(dir.path()).unwrap();
    let server = serve(
        ServerTransport::Tls(tls_server(&certs, ClientAuth::Required)),
        coordinator_auth(),
        Limits::default(),
        Stub::default(),
    )
    .await;
    let viewer = client_as(certs.files("viewer"), server.addr);
    let operator = client_as(certs.files("operator"), server.addr);
    let admin = client_as(certs.files("admin"), server.addr);
    let coordinator = client_as(certs.files("coordinator"), server.addr);

    // Allowed calls reach the handler, which sees the identity.
    assert_eq!(get_cluster(&viewer, "x").await.unwrap(), spiffe::VIEWER);
    assert_eq!(cancel_operation(&operator, "x").await.unwrap(), spiffe::OPERATOR);
    assert_eq!(create_cluster(&admin).await.unwrap(), spiffe::ADMIN);
    assert_eq!(cancel_operation(&admin, "x").await.unwrap(), spiffe::ADMIN);

    // A viewer cannot mutate; an operator cannot administer.
    let st = cancel_operation(&viewer, "x").await.unwrap_err();
    assert_role_required(
        &st,
        "operator",
        spiffe::VIEWER,
        "/ramsnap.snapshot.v1.OperationService/CancelOperation",
    );
    let st = create_cluster(&operator).await.unwrap_err();
    assert_role_required(
        &st,
        "admin",
        spiffe::OPERATOR,
        "/ramsnap.snapshot.v1.ClusterService/CreateCluster",
    );
    // An identity the policy does not name gets health only.
    health(&coordinator).await.unwrap();
    let st = get_cluster(&coordinator, "x").await.unwrap_err();
    assert_role_required(
        &st,
        "viewer",
        spiffe::COORDINATOR,
        "/ramsnap.snapshot.v1.ClusterService/GetCluster",
    );

    // Audit: the three allowed mutating calls, then the three denials;
    // reads (GetCluster by the viewer, health) leave nothing.
    let ev = take(&events);
    let line = |e: &HashMap<String, String>| {
        format!(
            "{} {} {} {}",
            e["identity"],
            e["rpc"].rsplit('/').next().unwrap(),
            e["outcome"],
            e["message"]
        )
    };
    let lines: Vec<String> = ev.iter().map(line).collect();
    assert_eq!(
        lines,
        [
            "spiffe://ramsnap/operator CancelOperation OK rpc",
            "spiffe://ramsnap/admin CreateCluster OK rpc",
            "spiffe://ramsnap/admin CancelOperation OK rpc",
            "spiffe://ramsnap/viewer CancelOperation PERMISSION_DENIED rpc denied",
            "spiffe://ramsnap/operator CreateCluster PERMISSION_DENIED rpc denied",
            "spiffe://ramsnap/coordinator GetCluster PERMISSION_DENIED rpc denied",
        ]
    );
    assert_eq!(ev[1]["identity_source"], "certificate");
    assert_eq!(ev[1]["required_role"], "admin");
    assert!(ev[1]["peer"].starts_with("127.0.0.1:"), "{:?}", ev[1]);
    assert!(ev[1].contains_key("duration_ms"));
    server.stop().await;
}

#[tokio::test]
async fn bearer_tokens_map_to_identities() {
    let dir = tempfile::tempdir().unwrap();
    let certs = ensure_dev_certs(dir.path()).unwrap();
    let token_file = dir.path().join("tokens");
    std::fs::write(
        &token_file,
        "ci-token-0123456789abcdef spiffe://ramsnap/operator\n",
    )
    .unwrap();
    let tokens = TokenTable::reloadable(&token_file, Some(POLL)).unwrap();
    let mut reloaded = tokens.subscribe();
    let server = serve(
        // Certificates are optional so that token-only clients connect.
        ServerTransport::Tls(tls_server(&certs, ClientAuth::Optional)),
        coordinator_auth().with_tokens(tokens),
        Limits::default(),
        Stub::default(),
    )
    .await;
    let anonymous = client_without_cert(&certs.ca(), server.addr);

    let with_token = |token: &str| {
        let bearer = Bearer::new(Some(token)).unwrap();
        let mut client = OperationServiceClient::with_interceptor(anonymous.clone(), bearer);
        async move {
            client
                .cancel_operation(pb::CancelOperationRequest::default())
                .await
                .map(|r| r.into_inner().operation.unwrap().operation_id)
        }
    };
    assert_eq!(
        with_token("ci-token-0123456789abcdef").await.unwrap(),
        spiffe::OPERATOR
    );
    let st = with_token("ci-token-0123456789abcdeX").await.unwrap_err();
    assert_eq!(st.code(), Code::Unauthenticated, "{st:?}");
    assert!(
        !st.message().contains("ci-token"),
        "tokens are never echoed: {st:?}"
    );
    // No certificate and no token: connected, but nobody.
    let st = health(&anonymous).await.unwrap_err();
    assert_eq!(st.code(), Code::Unauthenticated, "{st:?}");
    // A token decides even over a certificate.
    let admin = client_as(certs.files("admin"), server.addr);
    let mut client = ClusterServiceClient::with_interceptor(admin, |mut req: Request<()>| {
        req.metadata_mut().insert(
            "authorization",
            "Bearer ci-token-0123456789abcdef".parse().unwrap(),
        );
        Ok(req)
    });
    let st = client
        .create_cluster(pb::CreateClusterRequest::default())
        .await
        .unwrap_err();
    assert_role_required(
        &st,
        "admin",
        spiffe::OPERATOR,
        "/ramsnap.snapshot.v1.ClusterService/CreateCluster",
    );

    // The file is reloaded: the old token goes, a new one works.
    reloaded.borrow_and_update();
    std::fs::write(&token_file, "rotated-token-0123456789 spiffe://ramsnap/admin\n").unwrap();
    tokio::time::timeout(WAIT, reloaded.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        with_token("rotated-token-0123456789").await.unwrap(),
        spiffe::ADMIN
    );
    let st = with_token("ci-token-0123456789abcdef").await.unwrap_err();
    assert_eq!(st.code(), Code::Unauthenticated);
    server.stop().await;
}

/// Records the serial of each leaf certificate a server presents.
#[derive(Debug)]
struct RecordingVerifier {
    inner: Arc<WebPkiServerVerifier>,
    serials: Arc<Mutex<Vec<String>>>,
}

impl ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use x509_parser::prelude::FromDer;
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(end_entity).unwrap();
        self.serials.lock().unwrap().push(cert.raw_serial_as_string());
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn serial_of(pem_file: &Path) -> String {
    use rustls::pki_types::pem::PemObject;
    use x509_parser::prelude::FromDer;
    let der = CertificateDer::from_pem_file(pem_file).unwrap();
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&der).unwrap();
    cert.raw_serial_as_string()
}

/// Reissues `name` in the dev directory (same CA, new key and serial).
fn reissue(certs: &DevCerts, name: &str) {
    std::fs::remove_file(certs.files(name).cert).unwrap();
    ensure_dev_certs(&certs.dir).unwrap();
}

#[tokio::test]
async fn rotated_certificates_are_used_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let certs = ensure_dev_certs(dir.path()).unwrap();
    let server_tls = tls_server(&certs, ClientAuth::Required);
    let mut server_reloaded = server_tls.subscribe();
    let server = serve(
        ServerTransport::Tls(server_tls),
        coordinator_auth(),
        Limits::default(),
        Stub::default(),
    )
    .await;

    // A client that records the server certificate it is shown; it
    // presents the admin certificate.
    let serials = Arc::new(Mutex::new(Vec::new()));
    let verifier = RecordingVerifier {
        inner: WebPkiServerVerifier::builder_with_provider(roots(&certs.ca()), provider())
            .build()
            .unwrap(),
        serials: serials.clone(),
    };
    let admin = certs.files("admin");
    let recording = {
        use rustls::pki_types::pem::PemObject;
        let chain: Vec<_> = CertificateDer::pem_file_iter(&admin.cert)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&admin.key).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(chain, key)
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        ClientTransport::Tls(ClientTls::from_config(config))
    };
    let first_serial = serial_of(&certs.files("coordinator").cert);
    health(&channel(&recording, server.addr)).await.unwrap();
    assert_eq!(
        serials.lock().unwrap().as_slice(),
        std::slice::from_ref(&first_serial)
    );

    // 1. The server's certificate is reissued: new connections get it.
    server_reloaded.borrow_and_update();
    reissue(&certs, "coordinator");
    tokio::time::timeout(WAIT, server_reloaded.changed())
        .await
        .unwrap()
        .unwrap();
    let second_serial = serial_of(&certs.files("coordinator").cert);
    assert_ne!(first_serial, second_serial);
    health(&channel(&recording, server.addr)).await.unwrap();
    assert_eq!(*serials.lock().unwrap(), [first_serial, second_serial.clone()]);

    // 2. A broken file keeps the configuration in use.
    std::fs::write(certs.files("coordinator").cert, "not a certificate").unwrap();
    tokio::time::sleep(POLL * 4).await;
    health(&channel(&recording, server.addr)).await.unwrap();
    assert_eq!(serials.lock().unwrap().last(), Some(&second_serial));
    reissue(&certs, "coordinator");
    tokio::time::timeout(WAIT, server_reloaded.changed())
        .await
        .unwrap()
        .unwrap();

    // 3. The client's files change (its certificate becomes the viewer's):
    //    its next connection presents the new one.
    let client_files = TlsFiles {
        cert: dir.path().join("me.pem"),
        key: dir.path().join("me.key"),
        ca: certs.ca(),
    };
    std::fs::copy(&admin.cert, &client_files.cert).unwrap();
    std::fs::copy(&admin.key, &client_files.key).unwrap();
    let me = ClientTls::with_poll_interval(client_files.clone(), POLL).unwrap();
    let mut me_reloaded = me.subscribe();
    let me = ClientTransport::Tls(me);
    assert_eq!(
        create_cluster(&channel(&me, server.addr)).await.unwrap(),
        spiffe::ADMIN
    );
    me_reloaded.borrow_and_update();
    let viewer = certs.files("viewer");
    // Key first: until both are in place the pair does not load and the
    // old one stays.
    std::fs::copy(&viewer.key, &client_files.key).unwrap();
    std::fs::copy(&viewer.cert, &client_files.cert).unwrap();
    tokio::time::timeout(WAIT, me_reloaded.changed())
        .await
        .unwrap()
        .unwrap();
    let st = create_cluster(&channel(&me, server.addr)).await.unwrap_err();
    assert_role_required(
        &st,
        "admin",
        spiffe::VIEWER,
        "/ramsnap.snapshot.v1.ClusterService/CreateCluster",
    );

    // 4. The server's client CA is replaced: clients of the old CA are
    //    refused from then on, clients of the new one accepted. (Clients
    //    keep trusting the CA of the server's own certificate, kept aside.)
    let new_ca_dir = tempfile::tempdir().unwrap();
    let new_ca = ensure_dev_certs(new_ca_dir.path()).unwrap();
    let server_ca = dir.path().join("server-ca.pem");
    std::fs::copy(certs.ca(), &server_ca).unwrap();
    let old_ca_admin = TlsFiles {
        ca: server_ca.clone(),
        ..certs.files("admin")
    };
    let new_ca_admin = TlsFiles {
        ca: server_ca,
        ..new_ca.files("admin")
    };
    create_cluster(&client_as(old_ca_admin.clone(), server.addr))
        .await
        .unwrap();
    assert_refused_by_tls(create_cluster(&client_as(new_ca_admin.clone(), server.addr)).await);
    server_reloaded.borrow_and_update();
    std::fs::copy(new_ca.ca(), certs.ca()).unwrap();
    tokio::time::timeout(WAIT, server_reloaded.changed())
        .await
        .unwrap()
        .unwrap();
    assert_refused_by_tls(create_cluster(&client_as(old_ca_admin, server.addr)).await);
    assert_eq!(
        create_cluster(&client_as(new_ca_admin, server.addr))
            .await
            .unwrap(),
        spiffe::ADMIN
    );
    server.stop().await;
}

#[tokio::test]
async fn insecure_mode_is_loopback_only_and_everyone_is_the_local_identity() {
    let err = ServerTransport::insecure("0.0.0.0:50051".parse().unwrap()).unwrap_err();
    assert!(
        err.to_string().contains("only allowed on a loopback address"),
        "{err}"
    );
    assert!(ServerTransport::insecure("192.0.2.7:50051".parse().unwrap()).is_err());

    let (events, _guard) = capture_audit();
    let transport = ServerTransport::insecure("127.0.0.1:0".parse().unwrap()).unwrap();
    let server = serve(
        transport,
        AuthLayer::new(AuthMode::insecure_loopback(), Reloadable::fixed(Policy::empty())),
        Limits::default(),
        Stub::default(),
    )
    .await;
    let plain = channel(&ClientTransport::Insecure, server.addr);
    assert_eq!(create_cluster(&plain).await.unwrap(), "local-admin");
    let ev = take(&events);
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0]["identity_source"], "insecure-loopback");
    // A TLS client cannot talk to it.
    let dir = tempfile::tempdir().unwrap();
    let certs = ensure_dev_certs(dir.path()).unwrap();
    assert!(create_cluster(&client_as(certs.files("admin"), server.addr))
        .await
        .is_err());
    server.stop().await;
}

#[tokio::test]
async fn policy_file_changes_apply_to_the_next_call() {
    let dir = tempfile::tempdir().unwrap();
    let certs = ensure_dev_certs(dir.path()).unwrap();
    let policy_file = dir.path().join("policy.json");
    std::fs::write(&policy_file, r#"{"viewer": ["spiffe://ramsnap/viewer"]}"#).unwrap();
    let policy = Policy::reloadable(&policy_file, Some(POLL)).unwrap();
    let mut reloaded = policy.subscribe();
    reloaded.borrow_and_update();
    let server = serve(
        ServerTransport::Tls(tls_server(&certs, ClientAuth::Required)),
        AuthLayer::new(AuthMode::Tls, policy),
        Limits::default(),
        Stub::default(),
    )
    .await;
    let addr = server.addr;
    let viewer = ClientTransport::Tls(ClientTls::new(certs.files("viewer")).unwrap());
    // Ready as soon as health answers over TLS.
    ramsnap_common::ready::wait_serving_over(&viewer, addr, "", WAIT)
        .await
        .unwrap();
    let ch = channel(&viewer, addr);
    assert_eq!(
        cancel_operation(&ch, "x").await.unwrap_err().code(),
        Code::PermissionDenied
    );

    std::fs::write(&policy_file, r#"{"operator": ["spiffe://ramsnap/viewer"]}"#).unwrap();
    tokio::time::timeout(WAIT, reloaded.changed())
        .await
        .unwrap()
        .unwrap();
    // Same connection, next call.
    assert_eq!(cancel_operation(&ch, "x").await.unwrap(), spiffe::VIEWER);
    // A broken policy keeps the last good one.
    std::fs::write(&policy_file, r#"{"operators": []}"#).unwrap();
    tokio::time::sleep(POLL * 4).await;
    assert_eq!(cancel_operation(&ch, "x").await.unwrap(), spiffe::VIEWER);
    server.stop().await;
}

#[tokio::test]
async fn a_plain_text_client_gets_nothing_from_a_tls_server() {
    let dir = tempfile::tempdir().unwrap();
    let certs = ensure_dev_certs(dir.path()).unwrap();
    let server = serve(
        ServerTransport::Tls(tls_server(&certs, ClientAuth::Required)),
        coordinator_auth(),
        Limits::default(),
        Stub::default(),
    )
    .await;
    let plain = channel(&ClientTransport::Insecure, server.addr);
    assert!(health(&plain).await.is_err());
    server.stop().await;
}

#[tokio::test]
async fn concurrency_limit_and_unary_timeout() {
    let (events, _guard) = capture_audit();
    let dir = tempfile::tempdir().unwrap();
    let certs = ensure_dev_certs(dir.path()).unwrap();
    let stub = Stub::default();
    let limits = Limits {
        max_concurrent_calls: 2,
        max_concurrent_streams: 1,
        unary_timeout: Some(Duration::from_millis(300)),
        // Refused at once: what this test looks at.
        queue_wait: Duration::ZERO,
    };
    let server = serve(
        ServerTransport::Tls(tls_server(&certs, ClientAuth::Required)),
        coordinator_auth(),
        limits,
        stub.clone(),
    )
    .await;
    let admin = client_as(certs.files("admin"), server.addr);

    // Two calls hold both slots (their handlers have started)...
    let mut blocked = Vec::new();
    for _ in 0..2 {
        let entered = stub.entered.notified();
        let ch = admin.clone();
        blocked.push(tokio::spawn(async move { get_cluster(&ch, "block").await }));
        tokio::time::timeout(WAIT, entered).await.unwrap();
    }
    // ...so a third is refused at once, with a retry hint.
    let st = cancel_operation(&admin, "x").await.unwrap_err();
    assert_eq!(st.code(), Code::ResourceExhausted, "{st:?}");
    let details = st.get_error_details();
    assert_eq!(
        details.retry_info().unwrap().retry_delay,
        Some(Duration::from_secs(1))
    );
    assert_eq!(
        details.quota_failure().unwrap().violations[0].subject,
        "concurrent_calls"
    );
    // Health is never refused.
    health(&admin).await.unwrap();
    // The audit saw the refused mutating call.
    let ev = take(&events);
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0]["outcome"], "RESOURCE_EXHAUSTED");
    // Releasing them frees the slots. (Their own time limit is 300 ms;
    // they are released before it.)
    stub.release.add_permits(2);
    for b in blocked {
        assert_eq!(b.await.unwrap().unwrap(), spiffe::ADMIN);
    }
    assert_eq!(cancel_operation(&admin, "x").await.unwrap(), spiffe::ADMIN);

    // A unary call past the limit: DEADLINE_EXCEEDED, audited as such.
    take(&events);
    let st = cancel_operation(&admin, "slow:5000").await.unwrap_err();
    assert_eq!(st.code(), Code::DeadlineExceeded, "{st:?}");
    let ev = take(&events);
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0]["outcome"], "DEADLINE_EXCEEDED");
    // Its slot was given back.
    assert_eq!(get_cluster(&admin, "slow:10").await.unwrap(), spiffe::ADMIN);

    // A stream outlives the unary limit (3 × 200 ms > 300 ms)...
    let mut ops = OperationServiceClient::new(admin.clone());
    let mut stream = ops
        .watch_operation(pb::WatchOperationRequest {
            operation_id: "200".into(),
        })
        .await
        .unwrap()
        .into_inner();
    // ...while a second one is over the stream limit.
    let st = OperationServiceClient::new(admin.clone())
        .watch_operation(pb::WatchOperationRequest {
            operation_id: "0".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::ResourceExhausted, "{st:?}");
    assert_eq!(
        st.get_error_details().quota_failure().unwrap().violations[0].subject,
        "concurrent_streams"
    );
    let mut got = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        got.push(m.operation.unwrap().operation_id);
    }
    assert_eq!(got, ["0", "1", "2"]);
    // The finished stream gave its slot back.
    let mut again = OperationServiceClient::new(admin.clone())
        .watch_operation(pb::WatchOperationRequest {
            operation_id: "0".into(),
        })
        .await
        .unwrap()
        .into_inner();
    while again.message().await.unwrap().is_some() {}
    server.stop().await;
}
