//! Mutual TLS for every ramsnap port (rustls with the ring provider), with
//! certificates that are reloaded when their files change, and the
//! plain-text `--insecure` mode that is only allowed on loopback.
//!
//! Server side: [`ServerTls`] holds the current `ServerConfig` (certificate,
//! key, and the CA that client certificates must chain to);
//! [`ServerTls::incoming`] turns a `TcpListener` into the stream of TLS
//! connections that tonic's `serve_with_incoming[_shutdown]` takes. Each
//! handshake runs in a task of its own with a time limit, so a slow or
//! hostile client never holds up `accept`, and a failed handshake is logged,
//! never fatal. The connections are tokio-rustls `TlsStream<TcpStream>`s,
//! for which tonic puts the peer's certificates into every request
//! (`TlsConnectInfo`, `Request::peer_certs()`): that is where
//! [`crate::authz`] finds the caller's identity.
//!
//! Client side: [`ClientTls`] makes tonic channels that connect over TCP,
//! present the client certificate and check the server's against the CA,
//! with the configuration current at each (re)connection. [`ClientTransport`]
//! is what a binary holds: TLS, or plain text for `--insecure`.
//!
//! Rotation: replace the files (in place, or by a symlink swap as Kubernetes
//! does with Secrets); within [`reload::DEFAULT_POLL_INTERVAL`] new
//! connections use the new certificates. Established connections keep the
//! session they negotiated. A new file that does not load keeps the old
//! configuration and logs an error.
use crate::reload::{self, Reloadable};
use anyhow::Context as _;
use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

/// How long a TLS handshake may take, on either side, before the connection
/// is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How many server-side handshakes may be in progress at once; further
/// connections wait in the listen backlog. Bounds what a flood of idle
/// connections can hold (one socket and one small task each).
pub const MAX_PENDING_HANDSHAKES: usize = 1024;

/// The files of one TLS identity: its certificate chain (leaf first), its
/// private key (PKCS#8, PKCS#1 or SEC1, PEM), and the CA certificates that
/// the peer's certificate must chain to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl TlsFiles {
    /// `<dir>/<name>.pem`, `<dir>/<name>.key` and `<dir>/ca.pem`: the layout
    /// of [`crate::devcerts`] and of a Kubernetes Secret mounted as a
    /// directory.
    pub fn in_dir(dir: &Path, name: &str) -> TlsFiles {
        TlsFiles {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
            ca: dir.join("ca.pem"),
        }
    }

    fn paths(&self) -> Vec<PathBuf> {
        vec![self.cert.clone(), self.key.clone(), self.ca.clone()]
    }
}

/// Whether a server requires a client certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// Every client presents a certificate signed by the CA (mutual TLS).
    Required,
    /// A client may connect without a certificate (one that presents a
    /// certificate must still present a valid one); it then has to
    /// authenticate each call with a bearer token. For servers that accept
    /// tokens.
    Optional,
}

/// The ring provider, chosen explicitly so that no process-wide default
/// is needed and no other provider is pulled in. rustls 0.23.48 deprecates
/// it for lacking post-quantum key exchange (only aws-lc-rs has it); ring
/// stays the project's choice (pure Rust and assembly, no cmake, quick to
/// build) until that matters more than the build.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "{} holds no PEM certificate", path.display());
    Ok(certs)
}

fn read_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .with_context(|| format!("reading a private key from {}", path.display()))
}

fn read_roots(path: &Path) -> anyhow::Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        roots
            .add(cert)
            .with_context(|| format!("a CA certificate in {}", path.display()))?;
    }
    Ok(Arc::new(roots))
}

/// Builds a server configuration from the files: TLS 1.2 and 1.3, ALPN h2,
/// client certificates verified against `files.ca` (required or optional).
/// Fails if a file is missing or unreadable or if the key does not match the
/// certificate.
pub fn load_server_config(files: &TlsFiles, client_auth: ClientAuth) -> anyhow::Result<ServerConfig> {
    let chain = read_certs(&files.cert)?;
    let key = read_key(&files.key)?;
    let roots = read_roots(&files.ca)?;
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
    let verifier = match client_auth {
        ClientAuth::Required => verifier,
        ClientAuth::Optional => verifier.allow_unauthenticated(),
    }
    .build()
    .context("client certificate verifier")?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .with_context(|| format!("{} and {}", files.cert.display(), files.key.display()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Builds a client configuration from the files: the client certificate
/// and key to present, and the CA that server certificates must chain to.
pub fn load_client_config(files: &TlsFiles) -> anyhow::Result<ClientConfig> {
    let chain = read_certs(&files.cert)?;
    let key = read_key(&files.key)?;
    let roots = read_roots(&files.ca)?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .with_context(|| format!("{} and {}", files.cert.display(), files.key.display()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A server's TLS configuration, reloaded when its files change.
#[derive(Clone, Debug)]
pub struct ServerTls {
    config: Reloadable<ServerConfig>,
    handshake_timeout: Duration,
    max_pending: usize,
}

impl ServerTls {
    /// Loads the files (an error stops the start) and watches them every
    /// [`reload::DEFAULT_POLL_INTERVAL`]. Needs a Tokio runtime.
    pub fn new(files: TlsFiles, client_auth: ClientAuth) -> anyhow::Result<ServerTls> {
        ServerTls::with_poll_interval(files, client_auth, reload::DEFAULT_POLL_INTERVAL)
    }

    /// As [`ServerTls::new`], polling the files every `interval`.
    pub fn with_poll_interval(
        files: TlsFiles,
        client_auth: ClientAuth,
        interval: Duration,
    ) -> anyhow::Result<ServerTls> {
        let config = Reloadable::spawn("server TLS certificates", files.paths(), interval, move || {
            load_server_config(&files, client_auth)
        })?;
        Ok(ServerTls {
            config,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            max_pending: MAX_PENDING_HANDSHAKES,
        })
    }

    /// Other bounds than [`HANDSHAKE_TIMEOUT`] and
    /// [`MAX_PENDING_HANDSHAKES`] for [`ServerTls::incoming`].
    pub fn with_handshake_limits(mut self, timeout: Duration, max_pending: usize) -> ServerTls {
        self.handshake_timeout = timeout;
        self.max_pending = max_pending.max(1);
        self
    }

    /// The configuration new connections get now.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.config.current()
    }

    /// Told of every reload (tests wait on it).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Arc<ServerConfig>> {
        self.config.subscribe()
    }

    /// The TLS connections accepted on `listener`, for tonic's
    /// `serve_with_incoming[_shutdown]`; each handshake runs in a task of
    /// its own and takes at most [`HANDSHAKE_TIMEOUT`].
    pub fn incoming(&self, listener: TcpListener) -> TlsIncoming {
        // Completed connections wait here until tonic takes them.
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(accept_loop(
            listener,
            self.config.clone(),
            tx,
            self.handshake_timeout,
            self.max_pending,
        ));
        TlsIncoming {
            inner: ReceiverStream::new(rx),
        }
    }
}

/// The stream of accepted TLS connections (see [`ServerTls::incoming`]).
/// It never yields an error: failed handshakes are logged and dropped. When
/// the stream is dropped (the server stopped), the listener is closed.
pub struct TlsIncoming {
    inner: ReceiverStream<Result<TlsStream, std::io::Error>>,
}

/// A server-side TLS connection, as tonic's `Connected` knows it.
pub type TlsStream = tokio_rustls::server::TlsStream<TcpStream>;

impl tokio_stream::Stream for TlsIncoming {
    type Item = Result<TlsStream, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

async fn accept_loop(
    listener: TcpListener,
    config: Reloadable<ServerConfig>,
    tx: mpsc::Sender<Result<TlsStream, std::io::Error>>,
    handshake_timeout: Duration,
    max_pending: usize,
) {
    let pending = Arc::new(Semaphore::new(max_pending));
    loop {
        let permit = tokio::select! {
            p = pending.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = tx.closed() => return,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = tx.closed() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors and the like: wait a little instead of
                // spinning; a connection reset before accept is harmless.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(config.current());
        let tx = tx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    // The server may have stopped meanwhile: then the
                    // connection is just dropped.
                    let _ = tx.send(Ok(stream)).await;
                }
                // Closed before a word was said: a TCP probe (Kubernetes'
                // tcpSocket checks, every few seconds) or a port scan.
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    tracing::debug!(%peer, "connection closed before the TLS handshake")
                }
                Ok(Err(e)) => tracing::warn!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::warn!(%peer, timeout = ?handshake_timeout, "TLS handshake timed out"),
            }
        });
    }
}

/// A client's TLS configuration, reloaded when its files change, and the
/// server name it expects.
#[derive(Clone, Debug)]
pub struct ClientTls {
    config: Reloadable<ClientConfig>,
    server_name: Option<ServerName<'static>>,
}

impl ClientTls {
    /// Loads the files (an error is returned) and watches them every
    /// [`reload::DEFAULT_POLL_INTERVAL`]. Needs a Tokio runtime.
    pub fn new(files: TlsFiles) -> anyhow::Result<ClientTls> {
        ClientTls::with_poll_interval(files, reload::DEFAULT_POLL_INTERVAL)
    }

    /// As [`ClientTls::new`], polling the files every `interval`.
    pub fn with_poll_interval(files: TlsFiles, interval: Duration) -> anyhow::Result<ClientTls> {
        let config = Reloadable::spawn("client TLS certificates", files.paths(), interval, move || {
            load_client_config(&files)
        })?;
        Ok(ClientTls {
            config,
            server_name: None,
        })
    }

    /// A fixed configuration built elsewhere (never reloaded); it should
    /// offer ALPN `h2`.
    pub fn from_config(config: ClientConfig) -> ClientTls {
        ClientTls {
            config: Reloadable::fixed(config),
            server_name: None,
        }
    }

    /// Expects every server to present a certificate valid for `name` (a
    /// DNS name or an IP address) instead of the host of the address
    /// dialled: for agents reached by IP whose certificates name a service.
    pub fn with_server_name(mut self, name: &str) -> anyhow::Result<ClientTls> {
        let name = ServerName::try_from(name.to_string()).with_context(|| format!("server name {name:?}"))?;
        self.server_name = Some(name);
        Ok(self)
    }

    /// The configuration new connections get now.
    pub fn current(&self) -> Arc<ClientConfig> {
        self.config.current()
    }

    /// Told of every reload (tests wait on it).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Arc<ClientConfig>> {
        self.config.subscribe()
    }

    /// The connector tonic uses to open each connection: TCP, then a TLS
    /// handshake with the configuration current at that moment.
    pub fn connector(&self) -> TlsConnector {
        TlsConnector {
            config: self.config.clone(),
            server_name: self.server_name.clone(),
            timeout: HANDSHAKE_TIMEOUT,
        }
    }
}

/// Connects over TCP and TLS (see [`ClientTls::connector`]); a
/// `tower::Service<Uri>` for `Endpoint::connect_with_connector[_lazy]`.
#[derive(Clone, Debug)]
pub struct TlsConnector {
    config: Reloadable<ClientConfig>,
    server_name: Option<ServerName<'static>>,
    timeout: Duration,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl tower_service::Service<Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = BoxFuture<Result<Self::Response, std::io::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let config = self.config.current();
        let server_name = self.server_name.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
            let host = uri
                .host()
                .ok_or_else(|| invalid(format!("no host in {uri}")))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            let name = match server_name {
                Some(n) => n,
                None => ServerName::try_from(host.clone())
                    .map_err(|e| invalid(format!("server name {host:?}: {e}")))?,
            };
            let connect = async {
                let tcp = TcpStream::connect((host.as_str(), port)).await?;
                let _ = tcp.set_nodelay(true);
                tokio_rustls::TlsConnector::from(config).connect(name, tcp).await
            };
            let stream = tokio::time::timeout(timeout, connect).await.map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connecting to {host}:{port} (TCP and TLS) took more than {timeout:?}"),
                )
            })??;
            Ok(TokioIo::new(stream))
        })
    }
}

/// How a client reaches the services: TLS with its certificate, or plain
/// text (`--insecure`, for servers on loopback).
#[derive(Clone, Debug)]
pub enum ClientTransport {
    Tls(ClientTls),
    Insecure,
}

impl ClientTransport {
    /// The endpoint for `address` (`host:port`, `http://host:port` or
    /// `https://host:port`), to be given timeouts and the like, then passed
    /// to [`ClientTransport::connect_lazy`] or [`ClientTransport::connect`].
    ///
    /// With TLS, the transport decides, not the scheme: `http://` addresses
    /// (as stored before TLS was turned on) are reached over TLS too, so a
    /// stale address never downgrades a connection to plain text. Without
    /// TLS, an `https://` address is an error.
    pub fn endpoint(&self, address: &str) -> Result<Endpoint, TransportError> {
        let (scheme, rest) = match address.split_once("://") {
            Some((s, rest)) => (Some(s), rest),
            None => (None, address),
        };
        let bad = |reason: String| TransportError::Address {
            address: address.to_string(),
            reason,
        };
        if !matches!(scheme, None | Some("http") | Some("https")) {
            return Err(bad("the scheme must be http or https".into()));
        }
        match self {
            ClientTransport::Insecure => {
                if scheme == Some("https") {
                    return Err(bad("this client runs without TLS (--insecure)".into()));
                }
                Endpoint::from_shared(format!("http://{rest}")).map_err(|e| bad(e.to_string()))
            }
            ClientTransport::Tls(_) => {
                // The connector gets the http:// form (tonic's own TLS, when
                // its feature is on, would otherwise insist on handling
                // https:// itself); requests carry the https:// origin.
                let origin: Uri = format!("https://{rest}")
                    .parse()
                    .map_err(|e: http::uri::InvalidUri| bad(e.to_string()))?;
                Ok(Endpoint::from_shared(format!("http://{rest}"))
                    .map_err(|e| bad(e.to_string()))?
                    .origin(origin))
            }
        }
    }

    /// A channel that connects on first use (and reconnects, with the
    /// certificates current then).
    pub fn connect_lazy(&self, endpoint: &Endpoint) -> Channel {
        match self {
            ClientTransport::Insecure => endpoint.connect_lazy(),
            ClientTransport::Tls(tls) => endpoint.connect_with_connector_lazy(tls.connector()),
        }
    }

    /// A channel, connected now.
    pub async fn connect(&self, endpoint: &Endpoint) -> Result<Channel, tonic::transport::Error> {
        match self {
            ClientTransport::Insecure => endpoint.connect().await,
            ClientTransport::Tls(tls) => endpoint.connect_with_connector(tls.connector()).await,
        }
    }
}

/// How a server takes connections: TLS, or plain text on loopback.
#[derive(Clone, Debug)]
pub enum ServerTransport {
    Tls(ServerTls),
    /// Only made by [`ServerTransport::insecure`], which checks the address.
    InsecureLoopback,
}

impl ServerTransport {
    /// Plain text, refused unless `listen` is a loopback address.
    pub fn insecure(listen: SocketAddr) -> Result<ServerTransport, TransportError> {
        check_insecure_listen(listen)?;
        Ok(ServerTransport::InsecureLoopback)
    }

    /// Serves `router` on `listener` until `shutdown`: the TLS connections
    /// of [`ServerTls::incoming`], or plain text after checking again that
    /// the listener is on loopback. What `server::serve` calls instead of
    /// `serve_with_incoming_shutdown(TcpListenerStream::new(listener), ..)`.
    pub async fn serve<L, ResBody>(
        self,
        router: tonic::transport::server::Router<L>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()>
    where
        L: tower_layer::Layer<tonic::service::Routes>,
        L::Service: tower_service::Service<http::Request<tonic::body::Body>, Response = http::Response<ResBody>>
            + Clone
            + Send
            + 'static,
        <L::Service as tower_service::Service<http::Request<tonic::body::Body>>>::Future: Send,
        <L::Service as tower_service::Service<http::Request<tonic::body::Body>>>::Error:
            Into<Box<dyn std::error::Error + Send + Sync>> + Send,
        ResBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        ResBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        match self {
            ServerTransport::Tls(tls) => {
                router
                    .serve_with_incoming_shutdown(tls.incoming(listener), shutdown)
                    .await?
            }
            ServerTransport::InsecureLoopback => {
                check_insecure_listen(listener.local_addr()?)?;
                use tokio_stream::StreamExt as _;
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
                    conn.inspect(|s: &TcpStream| {
                        let _ = s.set_nodelay(true);
                    })
                });
                router.serve_with_incoming_shutdown(incoming, shutdown).await?
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error(
        "refusing to serve plain text on {0}: --insecure is only allowed on a loopback address \
         (127.0.0.1 or ::1); give the server a certificate (--tls-cert, --tls-key, --tls-client-ca) \
         or listen on loopback"
    )]
    InsecureNotLoopback(SocketAddr),
    #[error("invalid address {address:?}: {reason}")]
    Address { address: String, reason: String },
}

/// Refuses plain text on anything but a loopback address: a wildcard
/// (0.0.0.0, ::) or a routable address would expose every RPC, unencrypted
/// and unauthenticated, to the network.
pub fn check_insecure_listen(listen: SocketAddr) -> Result<(), TransportError> {
    let ip = listen.ip().to_canonical();
    if ip.is_loopback() {
        Ok(())
    } else {
        Err(TransportError::InsecureNotLoopback(listen))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insecure_only_on_loopback() {
        for ok in [
            "127.0.0.1:50051",
            "127.1.2.3:1",
            "[::1]:50051",
            "[::ffff:127.0.0.1]:1",
        ] {
            check_insecure_listen(ok.parse().unwrap()).unwrap();
        }
        for refused in ["0.0.0.0:50051", "[::]:50051", "10.0.0.5:50051", "[2001:db8::1]:1"] {
            let err = check_insecure_listen(refused.parse().unwrap()).unwrap_err();
            assert!(
                err.to_string().contains("only allowed on a loopback address"),
                "{err}"
            );
            assert!(ServerTransport::insecure(refused.parse().unwrap()).is_err());
        }
    }

    #[tokio::test]
    async fn endpoints_follow_the_transport_not_the_scheme() {
        let insecure = ClientTransport::Insecure;
        assert_eq!(
            insecure.endpoint("127.0.0.1:1").unwrap().uri(),
            "http://127.0.0.1:1/"
        );
        assert_eq!(insecure.endpoint("http://h:2").unwrap().uri(), "http://h:2/");
        assert!(insecure.endpoint("https://h:2").is_err());
        assert!(insecure.endpoint("ftp://h:2").is_err());
    }
}
