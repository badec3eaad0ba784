//! Limits on what callers can make a server do: how many calls run at once,
//! how long a unary call may run, how large a message may be.
//!
//! | limit | default | what happens beyond it |
//! |---|---|---|
//! | calls in progress (unary and long unary), per server | 256 ([`DEFAULT_MAX_CONCURRENT_CALLS`]) | the call waits up to 10 s ([`DEFAULT_QUEUE_WAIT`]) for a slot, then RESOURCE_EXHAUSTED, with RetryInfo (retry after 1 s) and a QuotaFailure naming `concurrent_calls` |
//! | open response streams (Watch…, CopyVolume, SnapshotVm, reflection), per server | 1024 ([`DEFAULT_MAX_CONCURRENT_STREAMS`]) | as above, naming `concurrent_streams` |
//! | time for a unary call | 60 s ([`DEFAULT_UNARY_TIMEOUT`]) | DEADLINE_EXCEEDED; the handler is dropped (cancelled) |
//! | time for a long unary call (see [`crate::rpcs::CallKind::Long`]) or a stream | none on the server | the client's deadline (`grpc-timeout`) still applies to a unary call |
//! | request message | 4 MiB ([`DEFAULT_MAX_DECODING_MESSAGE_BYTES`]); StorageService 32 MiB ([`STORAGE_MAX_DECODING_MESSAGE_BYTES`], twice the largest VM descriptor) | RESOURCE_EXHAUSTED from tonic |
//! | response message | 64 MiB ([`DEFAULT_MAX_ENCODING_MESSAGE_BYTES`], what the ramsnap clients accept) | RESOURCE_EXHAUSTED from tonic |
//! | TLS handshake | 10 s, 1024 in progress ([`crate::tls::HANDSHAKE_TIMEOUT`], [`crate::tls::MAX_PENDING_HANDSHAKES`]) | the connection is dropped; further connections wait in the listen backlog |
//!
//! A call counts from when it is admitted until its response has been sent
//! in full (the last message of a stream, or its trailers), or the client
//! went away. Health checks (`grpc.health.v1.Health`) are never refused by
//! these limits, so that a busy server is not taken for a dead one.
//!
//! Why not tonic's own: `Server::builder().timeout()` bounds the time until
//! a response's headers, which for a stream ends when the handler returns
//! it (the stream itself is not cut) but for a long unary call (a memory
//! dump checksum, a qemu-img merge) kills work that is going fine, and it
//! answers CANCELLED, not DEADLINE_EXCEEDED. `concurrency_limit_per_connection`
//! is per connection, and queues instead of refusing. The layer here knows
//! each RPC's kind from [`crate::rpcs::RPCS`] and refuses at once with a
//! retry hint. Put it after the auth layer
//! (`Server::builder().layer(auth).layer(limits)`): unauthenticated calls
//! are refused before they take a slot, and the audit trail sees the
//! refusals and timeouts of mutating calls.
use crate::rpcs::{self, CallKind};
use bytes::Bytes;
use http_body::Frame;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::body::Body;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

pub const DEFAULT_MAX_CONCURRENT_CALLS: usize = 256;
pub const DEFAULT_MAX_CONCURRENT_STREAMS: usize = 1024;
pub const DEFAULT_UNARY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a call waits for a slot before it is refused: a burst (500
/// CreateVm at once) queues briefly instead of failing.
pub const DEFAULT_QUEUE_WAIT: Duration = Duration::from_secs(10);
/// tonic's own default, kept for every service but storage.
pub const DEFAULT_MAX_DECODING_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// StorageService takes whole VM descriptors (OVF, up to 16 MiB): twice
/// that, so an oversized one still reaches the handler for a field error.
pub const STORAGE_MAX_DECODING_MESSAGE_BYTES: usize = 32 * 1024 * 1024;
pub const DEFAULT_MAX_ENCODING_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// What a refused caller is told to wait before retrying.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The largest request message a service's server should accept.
pub fn max_decoding_message_bytes(service: &str) -> usize {
    match service {
        "ramsnap.storage.v1.StorageService" => STORAGE_MAX_DECODING_MESSAGE_BYTES,
        _ => DEFAULT_MAX_DECODING_MESSAGE_BYTES,
    }
}

/// Sets a generated server's message size limits to the defaults above:
/// `StorageApi::new(s).into_server().with_message_limits()`.
pub trait MessageLimits: Sized {
    #[must_use]
    fn with_message_limits(self) -> Self;
}

macro_rules! message_limits {
    ($($server:path => $service:path),* $(,)?) => {$(
        impl<T: $service> MessageLimits for $server {
            fn with_message_limits(self) -> Self {
                let name = <Self as tonic::server::NamedService>::NAME;
                self.max_decoding_message_size(max_decoding_message_bytes(name))
                    .max_encoding_message_size(DEFAULT_MAX_ENCODING_MESSAGE_BYTES)
            }
        }
    )*};
}

mod generated {
    pub use ramsnap_proto::host::v1::host_service_server::{HostService, HostServiceServer};
    pub use ramsnap_proto::snapshot::v1::cluster_service_server::{ClusterService, ClusterServiceServer};
    pub use ramsnap_proto::snapshot::v1::operation_service_server::{
        OperationService, OperationServiceServer,
    };
    pub use ramsnap_proto::snapshot::v1::snapshot_service_server::{SnapshotService, SnapshotServiceServer};
    pub use ramsnap_proto::snapshot::v1::vm_service_server::{VmService, VmServiceServer};
    pub use ramsnap_proto::storage::v1::storage_service_server::{StorageService, StorageServiceServer};
}

message_limits! {
    generated::HostServiceServer<T> => generated::HostService,
    generated::StorageServiceServer<T> => generated::StorageService,
    generated::ClusterServiceServer<T> => generated::ClusterService,
    generated::VmServiceServer<T> => generated::VmService,
    generated::SnapshotServiceServer<T> => generated::SnapshotService,
    generated::OperationServiceServer<T> => generated::OperationService,
}

/// The limits of one server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_concurrent_calls: usize,
    pub max_concurrent_streams: usize,
    /// `None`: no server-side time limit on unary calls.
    pub unary_timeout: Option<Duration>,
    /// How long a call waits for a free slot before RESOURCE_EXHAUSTED.
    pub queue_wait: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_concurrent_calls: DEFAULT_MAX_CONCURRENT_CALLS,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            unary_timeout: Some(DEFAULT_UNARY_TIMEOUT),
            queue_wait: DEFAULT_QUEUE_WAIT,
        }
    }
}

/// The tower layer enforcing [`Limits`]; one per server (its counters are
/// shared by every connection of the server it is given to).
#[derive(Clone, Debug)]
pub struct LimitsLayer {
    limits: Limits,
    calls: Arc<Semaphore>,
    streams: Arc<Semaphore>,
}

impl LimitsLayer {
    pub fn new(limits: Limits) -> LimitsLayer {
        LimitsLayer {
            limits,
            calls: Arc::new(Semaphore::new(limits.max_concurrent_calls)),
            streams: Arc::new(Semaphore::new(limits.max_concurrent_streams)),
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }
}

impl Default for LimitsLayer {
    fn default() -> Self {
        LimitsLayer::new(Limits::default())
    }
}

impl<S> tower_layer::Layer<S> for LimitsLayer {
    type Service = LimitsService<S>;

    fn layer(&self, inner: S) -> LimitsService<S> {
        LimitsService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of [`LimitsLayer`].
#[derive(Clone, Debug)]
pub struct LimitsService<S> {
    inner: S,
    layer: LimitsLayer,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

fn exhausted(subject: &str, limit: usize) -> Status {
    let description = format!(
        "the server already runs {limit} {}; retry later",
        subject.replace('_', " ")
    );
    let mut details = ErrorDetails::with_retry_info(Some(RETRY_AFTER));
    details.add_quota_failure_violation(subject, description.clone());
    Status::with_error_details(Code::ResourceExhausted, description, details)
}

impl<S, B> tower_service::Service<http::Request<B>> for LimitsService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path();
        let kind = rpcs::lookup(path).map(|r| r.kind).unwrap_or(CallKind::Unary);
        let limits = self.layer.limits;
        let slot = if path.starts_with("/grpc.health.v1.Health/") {
            None
        } else {
            Some(match kind {
                CallKind::Stream => (
                    self.layer.streams.clone(),
                    "concurrent_streams",
                    limits.max_concurrent_streams,
                ),
                CallKind::Unary | CallKind::Long => (
                    self.layer.calls.clone(),
                    "concurrent_calls",
                    limits.max_concurrent_calls,
                ),
            })
        };
        let path = path.to_string();
        let timeout = match kind {
            CallKind::Unary => limits.unary_timeout,
            CallKind::Long | CallKind::Stream => None,
        };
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            // A slot now, or within the queue wait; else refused at once
            // with a retry hint.
            let permit = match slot {
                None => None,
                Some((semaphore, subject, limit)) => match semaphore.clone().try_acquire_owned() {
                    Ok(p) => Some(p),
                    Err(_) => {
                        match tokio::time::timeout(limits.queue_wait, semaphore.acquire_owned()).await {
                            Ok(Ok(p)) => Some(p),
                            _ => {
                                tracing::warn!(path, subject, limit, "call refused: limit reached");
                                return Ok(exhausted(subject, limit).into_http());
                            }
                        }
                    }
                },
            };
            let call = inner.call(req);
            let response = match timeout {
                None => call.await?,
                Some(t) => match tokio::time::timeout(t, call).await {
                    Ok(r) => r?,
                    Err(_) => {
                        return Ok(Status::deadline_exceeded(format!(
                            "the server's time limit for this call ({t:?}) passed"
                        ))
                        .into_http())
                    }
                },
            };
            Ok(match permit {
                Some(permit) => response.map(|inner| {
                    Body::new(PermitBody {
                        inner,
                        _permit: permit,
                    })
                }),
                None => response,
            })
        })
    }
}

/// A response body that holds its call's slot until it is sent or dropped.
struct PermitBody {
    inner: Body,
    _permit: OwnedSemaphorePermit,
}

impl http_body::Body for PermitBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_takes_larger_messages() {
        assert_eq!(
            max_decoding_message_bytes("ramsnap.storage.v1.StorageService"),
            STORAGE_MAX_DECODING_MESSAGE_BYTES
        );
        assert_eq!(
            max_decoding_message_bytes("ramsnap.host.v1.HostService"),
            DEFAULT_MAX_DECODING_MESSAGE_BYTES
        );
    }

    /// The time limit follows the table: a unary call is cut, a long one
    /// (VerifyMemory) and an unknown path's kind (unary) as documented.
    #[tokio::test]
    async fn only_plain_unary_calls_are_timed_out() {
        use tower::{Layer, ServiceExt};
        let layer = LimitsLayer::new(Limits {
            unary_timeout: Some(Duration::from_millis(50)),
            ..Limits::default()
        });
        let slow = tower::service_fn(|_req: http::Request<()>| async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok::<_, std::convert::Infallible>(http::Response::new(Body::empty()))
        });
        let svc = layer.layer(slow);
        let call = |path: &'static str| {
            let svc = svc.clone();
            async move {
                let req = http::Request::builder().uri(path).body(()).unwrap();
                let resp = svc.oneshot(req).await.unwrap();
                resp.headers()
                    .get("grpc-status")
                    .map(|v| v.to_str().unwrap().to_string())
            }
        };
        let deadline = Some((Code::DeadlineExceeded as i32).to_string());
        assert_eq!(call("/ramsnap.host.v1.HostService/GetHostInfo").await, deadline);
        assert_eq!(call("/ramsnap.host.v1.HostService/VerifyMemory").await, None);
        assert_eq!(call("/ramsnap.storage.v1.StorageService/MergeVolume").await, None);
        assert_eq!(call("/no.Such/Call").await, deadline);
    }

    #[test]
    fn refusal_tells_when_to_retry() {
        let st = exhausted("concurrent_calls", 3);
        assert_eq!(st.code(), Code::ResourceExhausted);
        let d = st.get_error_details();
        assert_eq!(d.retry_info().unwrap().retry_delay, Some(RETRY_AFTER));
        assert_eq!(
            d.quota_failure().unwrap().violations[0].subject,
            "concurrent_calls"
        );
    }
}
