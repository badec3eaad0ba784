//! One way to run a ramsnap gRPC server: the service's routes plus gRPC
//! reflection (v1 and v1alpha, for old and new grpcurl) and grpc.health.v1,
//! request spans through `tracing`, and a bounded stop on SIGTERM/SIGINT.
//!
//! # Stopping
//!
//! When the shutdown future given to [`serve`] resolves (the first SIGTERM or
//! SIGINT, see [`stop_on_signals`]):
//! 1. the listener is closed and health reports NOT_SERVING;
//! 2. every open server stream (WatchVm, WatchOperation, WatchVmStatus, copy
//!    and snapshot progress, health Watch, ...) ends at once, at its next
//!    wait for data, with UNAVAILABLE "the server is shutting down": a client
//!    reconnects to the next instance;
//! 3. calls still running (unary handlers) get the grace period
//!    ([`DEFAULT_SHUTDOWN_GRACE`], `--shutdown-grace`) to finish; after it
//!    [`serve`] returns anyway and the process exits, abandoning them.
//!
//! The process then exits within about a second ([`main`] gives tasks still
//! running one second; ramsnapd and the coordinator give their database pool
//! two): at worst grace + 3 s after the signal. A second signal exits the
//! process at once. Keep the grace well under the supervisor's own limit
//! (Kubernetes' `terminationGracePeriodSeconds`, 30 s in `k8s/`), which ends
//! in SIGKILL.
//!
//! # Start-up errors
//!
//! [`main`] runs a binary's async main and reports an error as one line on
//! stderr (`ramsnapd: cannot listen on 127.0.0.1:50051: address already in
//! use`), exit code 1: no `Error: ` debug dump, no backtrace.
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::Routes;
use tonic_health::ServingStatus;

/// How long calls in flight get to finish after a shutdown signal.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

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

/// An I/O error as a clause: "address already in use", not "Address already
/// in use (os error 98)".
pub fn io_reason(e: &std::io::Error) -> String {
    let s = e.to_string();
    let s = match s.rfind(" (os error ") {
        Some(i) if s.ends_with(')') => s[..i].to_string(),
        _ => s,
    };
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => s,
    }
}

/// Binds `addr` without announcing it; the error is one clause
/// ("cannot listen on 127.0.0.1:50051: address already in use").
pub async fn listen(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {}", io_reason(&e)))
}

/// Prints one JSON line on stdout for a bound listener, so that a supervisor
/// or a test learns the port (useful with port 0).
pub fn announce(name: &str, listener: &TcpListener) -> anyhow::Result<()> {
    let local = listener.local_addr()?;
    println!(
        "{}",
        serde_json::json!({"event": "listening", "service": name, "addr": local.to_string()})
    );
    tracing::info!(service = name, %local, "listening");
    Ok(())
}

/// [`listen`], then [`announce`].
pub async fn bind(name: &str, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let listener = listen(addr).await?;
    announce(name, &listener)?;
    Ok(listener)
}

/// Serves the sets on one listener until `shutdown` resolves, then stops as
/// the module documentation says, with [`DEFAULT_SHUTDOWN_GRACE`].
///
/// Plain text and every caller the local identity (`local-admin`): for
/// in-process tests only, and refused unless the listener is on loopback.
/// The binaries use [`serve_with_grace`] with the security their flags
/// build.
pub async fn serve(
    listener: TcpListener,
    sets: Vec<ServiceSet>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let security = loopback_security(listener.local_addr()?)?;
    serve_with_grace(listener, sets, shutdown, DEFAULT_SHUTDOWN_GRACE, security).await
}

/// Plain text on a loopback `listen` address, every caller the local
/// identity with every role, the default limits: what `--insecure` gives,
/// for in-process tests. Refused on any other address.
pub fn loopback_security(listen: SocketAddr) -> anyhow::Result<crate::security::ServerSecurity> {
    crate::security::ServerSecurityArgs {
        insecure: true,
        local_identity: crate::authz::DEFAULT_LOCAL_IDENTITY.into(),
        max_concurrent_calls: crate::limits::DEFAULT_MAX_CONCURRENT_CALLS,
        max_concurrent_streams: crate::limits::DEFAULT_MAX_CONCURRENT_STREAMS,
        unary_timeout_secs: crate::limits::DEFAULT_UNARY_TIMEOUT.as_secs(),
        ..Default::default()
    }
    .server(crate::security::ServerKind::Coordinator, "coordinator", listen)
}

/// Serves `sets` on `listener` with `security` (TLS or loopback plain
/// text, the auth and audit layer, the limits) until `shutdown`; calls
/// still in flight then get `grace` before this returns regardless.
pub async fn serve_with_grace(
    listener: TcpListener,
    sets: Vec<ServiceSet>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
    security: crate::security::ServerSecurity,
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

    // Outermost first: authentication, authorization and audit, then the
    // limits (a refused caller takes no slot), then the stream ender.
    let (auth, limits) = security.layers();
    let stop = CancellationToken::new();
    let router = tonic::transport::Server::builder()
        .trace_fn(crate::tracecontext::server_span)
        .layer(auth)
        .layer(limits)
        .layer(EndStreamsLayer { stop: stop.clone() })
        .add_routes(routes);
    // TCP_NODELAY on every accepted socket (Nagle plus the client's delayed
    // ACK held back the last segment of responses by ~40 ms): see
    // `ServerTransport::serve`.
    let server = security
        .transport
        .serve(router, listener, stop.clone().cancelled_owned());

    // Resolves `grace` after the shutdown began; the server normally ends
    // first (once the calls in flight are done).
    let deadline = async {
        shutdown.await;
        tracing::info!(
            grace_ms = grace.as_millis() as u64,
            "shutting down: streams end now, calls in flight get the grace period"
        );
        // NOT_SERVING first, so that health watchers see it before their
        // stream ends.
        reporter.set_service_status("", ServingStatus::NotServing).await;
        for name in &names {
            reporter
                .set_service_status(*name, ServingStatus::NotServing)
                .await;
        }
        stop.cancel();
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        r = server => r?,
        _ = deadline => {
            tracing::warn!(grace_ms = grace.as_millis() as u64, "shutdown grace period over: abandoning the calls still in flight");
        }
    }
    Ok(())
}

/// Wraps every response body so that it ends when `stop` fires.
#[derive(Clone)]
struct EndStreamsLayer {
    stop: CancellationToken,
}

impl<S> tower_layer::Layer<S> for EndStreamsLayer {
    type Service = EndStreams<S>;

    fn layer(&self, inner: S) -> EndStreams<S> {
        EndStreams {
            inner,
            stop: self.stop.clone(),
        }
    }
}

#[derive(Clone)]
struct EndStreams<S> {
    inner: S,
    stop: CancellationToken,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> tower_service::Service<http::Request<Body>> for EndStreams<S>
where
    S: tower_service::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let call = self.inner.call(req);
        let stop = self.stop.clone();
        Box::pin(async move {
            let response = call.await?;
            Ok(response.map(|body| Body::new(EndOnStop::new(body, stop))))
        })
    }
}

/// A response body that, once `stop` fires, ends at its next wait for data
/// with grpc-status UNAVAILABLE. Data already available still goes out
/// first, so a unary response (always ready) is never cut.
struct EndOnStop {
    inner: Body,
    stop: CancellationToken,
    /// Made at the first wait (unary responses never wait: no allocation).
    stopped: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    done: bool,
}

impl EndOnStop {
    fn new(inner: Body, stop: CancellationToken) -> EndOnStop {
        EndOnStop {
            inner,
            stop,
            stopped: None,
            done: false,
        }
    }
}

impl http_body::Body for EndOnStop {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => {}
            Poll::Ready(None) => {
                this.done = true;
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Ok(frame))) => {
                if frame.is_trailers() {
                    this.done = true;
                }
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(Some(Err(e))) => {
                this.done = true;
                return Poll::Ready(Some(Err(e)));
            }
        }
        let stop = &this.stop;
        let stopped = this
            .stopped
            .get_or_insert_with(|| Box::pin(stop.clone().cancelled_owned()));
        if stopped.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        this.done = true;
        let mut trailers = http::HeaderMap::new();
        let status = tonic::Status::unavailable("the server is shutting down");
        if let Err(e) = status.add_header(&mut trailers) {
            return Poll::Ready(Some(Err(e)));
        }
        Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A token cancelled at the first SIGTERM or SIGINT; a second one exits the
/// process at once (status 128 + the signal's number). Installs the handlers
/// before returning, so a signal right after start-up is never lost.
pub fn stop_on_signals() -> anyhow::Result<CancellationToken> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| anyhow::anyhow!("cannot handle SIGTERM: {}", io_reason(&e)))?;
    let mut int = signal(SignalKind::interrupt())
        .map_err(|e| anyhow::anyhow!("cannot handle SIGINT: {}", io_reason(&e)))?;
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        stop.cancel();
        let code = tokio::select! {
            _ = term.recv() => 128 + libc_sig::TERM,
            _ = int.recv() => 128 + libc_sig::INT,
        };
        tracing::warn!("second signal: exiting now, without waiting for the calls in flight");
        std::process::exit(code);
    });
    Ok(token)
}

/// Signal numbers (the same on every Linux architecture).
mod libc_sig {
    pub const INT: i32 = 2;
    pub const TERM: i32 = 15;
}

/// Resolves on the first SIGTERM or SIGINT (a second one exits the process).
pub async fn shutdown_signal() {
    match stop_on_signals() {
        Ok(token) => token.cancelled_owned().await,
        Err(e) => {
            tracing::error!(error = %e, "no signal handling: stopping only on SIGKILL");
            std::future::pending().await
        }
    }
}

/// Parses a duration for `--shutdown-grace`: `10s`, `500ms`, `2m`, or bare
/// seconds (`10`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 10s, 500ms or 2m"))?;
    match unit.trim() {
        "" | "s" => Ok(Duration::from_secs(n)),
        "ms" => Ok(Duration::from_millis(n)),
        "m" => n
            .checked_mul(60)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("{s:?} is too long")),
        _ => Err(format!("{s:?} is not a duration like 10s, 500ms or 2m")),
    }
}

/// `url` with the password (`user:PASSWORD@`) replaced by `***`, for messages.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_string();
    };
    match authority[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end + 3],
            &authority[..colon],
            &url[scheme_end + 3 + at..]
        ),
        None => url.to_string(),
    }
}

/// Runs a binary's async main on a multi-threaded runtime. An error is one
/// line on stderr, `<program>: <error>: <cause>...`, and exit status 1.
/// Tasks still running when `main` returns (abandoned calls, blocking
/// libvirt calls) get one second, then the process exits regardless.
pub fn main<F>(program: &str, main: F) -> std::process::ExitCode
where
    F: Future<Output = anyhow::Result<()>>,
{
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {}", io_reason(&e)))
        .and_then(|rt| {
            let r = rt.block_on(main);
            rt.shutdown_timeout(Duration::from_secs(1));
            r
        });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program}: {}", one_line(&format!("{e:#}")));
            std::process::ExitCode::FAILURE
        }
    }
}

/// `s` with its line breaks (and the indentation after them) turned into
/// single spaces.
fn one_line(s: &str) -> String {
    s.split(['\n', '\r'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_read_as_clauses() {
        let e = std::io::Error::from_raw_os_error(98);
        assert_eq!(io_reason(&e), "address already in use");
        let e = std::io::Error::other("Custom thing (not an os error)");
        assert_eq!(io_reason(&e), "custom thing (not an os error)");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        for bad in ["", "s", "-1s", "1.5s", "10h", "ten"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://ramsnap:secret@127.0.0.1:5432/ramsnap"),
            "postgres://ramsnap:***@127.0.0.1:5432/ramsnap"
        );
        assert_eq!(
            redact_url("postgres://u:p@ss@h/db?x=@"),
            "postgres://u:***@h/db?x=@"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("sqlite:/var/lib/x.db"), "sqlite:/var/lib/x.db");
    }

    #[test]
    fn one_line_joins_lines() {
        assert_eq!(one_line("a: b\n  c\r\nd"), "a: b c d");
    }
}
