//! The audit trail: one `tracing` event (target [`TARGET`]) per mutating
//! call (any RPC that needs more than the viewer role), emitted when the
//! call ends, and one per denied call of any kind.
//!
//! Fields: `identity`, `identity_source` (certificate, token,
//! insecure-loopback), `rpc` (the path: the request body is protobuf and is
//! not decoded here; handlers log their own ids inside the request's span),
//! `required_role`, `outcome` (the gRPC code name: OK, PERMISSION_DENIED,
//! DEADLINE_EXCEEDED, ... or CANCELLED when the call ended without a
//! status, e.g. the client went away during a stream), `grpc_code`,
//! `duration_ms`, `peer`. Route them with `RUST_LOG=ramsnap::audit=info` or
//! a tracing filter on the target; with `RAMSNAP_LOG_FORMAT=json` each is
//! one JSON line. Events are children of the call's `grpc` span.
use crate::authn::Identity;
use crate::rpcs::Rpc;
use bytes::Bytes;
use http_body::Frame;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;
use tonic::body::Body;
use tonic::{Code, Status};

/// The `tracing` target of audit events.
pub const TARGET: &str = "ramsnap::audit";

pub use crate::status::code_name;

fn grpc_status(headers: &http::HeaderMap) -> Option<Code> {
    let v = headers.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    Some(Code::from_i32(v))
}

/// A refused call: logged at once, whatever the RPC.
pub(crate) fn denied(
    path: &str,
    identity: Option<&Identity>,
    rpc: Option<&Rpc>,
    status: &Status,
    peer: Option<SocketAddr>,
) {
    // Paths that are no RPC of ramsnap are counted under one label: a
    // client must not make a series per path it invents.
    crate::metrics::record_rpc(
        rpc.map(|r| r.path).unwrap_or("unknown"),
        status.code() as i32,
        0.0,
    );
    tracing::warn!(
        target: TARGET,
        identity = identity.map(|i| i.name.as_str()).unwrap_or(""),
        identity_source = identity.map(|i| i.source.as_str()).unwrap_or("none"),
        rpc = path,
        required_role = rpc.map(Rpc::required).unwrap_or("none: not an RPC of ramsnap"),
        outcome = code_name(status.code()),
        grpc_code = status.code() as i32,
        duration_ms = 0u64,
        peer = peer.map(|p| p.to_string()).unwrap_or_default(),
        reason = status.message(),
        "rpc denied"
    );
}

/// An allowed call, measured when it ends (and logged if it is mutating).
pub(crate) struct CallRecord {
    pub identity: Identity,
    pub rpc: &'static Rpc,
    pub peer: Option<SocketAddr>,
    pub start: Instant,
    pub span: tracing::Span,
    /// The saga the call was made for, and its owner's generation.
    pub fence: Option<crate::fence::Fence>,
    /// Logged (mutating calls), besides being measured (every call).
    pub log: bool,
}

impl CallRecord {
    fn emit(&self, code: Option<Code>) {
        let code = code.unwrap_or(Code::Cancelled);
        crate::metrics::record_rpc(self.rpc.path, code as i32, self.start.elapsed().as_secs_f64());
        if !self.log {
            return;
        }
        tracing::info!(
            target: TARGET,
            parent: &self.span,
            identity = %self.identity.name,
            identity_source = self.identity.source.as_str(),
            rpc = self.rpc.path,
            required_role = self.rpc.required(),
            outcome = code_name(code),
            grpc_code = code as i32,
            duration_ms = self.start.elapsed().as_millis() as u64,
            peer = self.peer.map(|p| p.to_string()).unwrap_or_default(),
            saga = self.fence.map(|f| f.saga.to_string()).unwrap_or_default(),
            saga_generation = self.fence.map(|f| f.generation).unwrap_or(0),
            "rpc"
        );
    }

    /// Logs now if the response already carries its status (an error
    /// answered without a body), else when the body's trailers pass or the
    /// body is dropped.
    pub(crate) fn finish_with(self, response: http::Response<Body>) -> http::Response<Body> {
        if let Some(code) = grpc_status(response.headers()) {
            self.emit(Some(code));
            return response;
        }
        response.map(|inner| {
            Body::new(AuditBody {
                inner,
                record: Some(self),
                code: None,
            })
        })
    }
}

struct AuditBody {
    inner: Body,
    record: Option<CallRecord>,
    code: Option<Code>,
}

impl AuditBody {
    fn finish(&mut self) {
        if let Some(record) = self.record.take() {
            record.emit(self.code);
        }
    }
}

impl Drop for AuditBody {
    fn drop(&mut self) {
        self.finish();
    }
}

impl http_body::Body for AuditBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                // Trailers are the last frame: the call is over.
                if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                    this.code = Some(code);
                    this.finish();
                }
            }
            Poll::Ready(Some(Err(status))) => {
                this.code = Some(status.code());
                this.finish();
            }
            Poll::Ready(None) => this.finish(),
            Poll::Pending => {}
        }
        polled
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
    use crate::authn::IdentitySource;
    use crate::rpcs::RoleSet;
    use std::sync::{Arc, Mutex};

    /// Records the `outcome` of audit events.
    struct Outcomes(Arc<Mutex<Vec<String>>>);

    struct Outcome<'a>(&'a mut Option<String>);

    impl tracing::field::Visit for Outcome<'_> {
        fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
            if field.name() == "outcome" {
                *self.0 = Some(value.to_string());
            }
        }
        fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
    }

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Outcomes {
        fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
            let mut outcome = None;
            event.record(&mut Outcome(&mut outcome));
            if let Some(o) = outcome {
                self.0.lock().unwrap().push(o);
            }
        }
    }

    /// A body that never ends (a stream the client walks away from).
    struct Endless;

    impl http_body::Body for Endless {
        type Data = Bytes;
        type Error = Status;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
            Poll::Pending
        }
    }

    /// A body of only trailers with `grpc-status: 5`.
    struct Trailers(bool);

    impl http_body::Body for Trailers {
        type Data = Bytes;
        type Error = Status;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
            if std::mem::replace(&mut self.0, true) {
                return Poll::Ready(None);
            }
            let mut t = http::HeaderMap::new();
            t.insert("grpc-status", "5".parse().unwrap());
            Poll::Ready(Some(Ok(Frame::trailers(t))))
        }
    }

    fn record() -> CallRecord {
        CallRecord {
            identity: Identity {
                name: "op".into(),
                source: IdentitySource::Certificate,
                roles: RoleSet::all(),
            },
            rpc: crate::rpcs::lookup("/ramsnap.storage.v1.StorageService/CopyVolume").unwrap(),
            peer: None,
            start: Instant::now(),
            span: tracing::Span::none(),
            fence: None,
            log: true,
        }
    }

    #[tokio::test]
    async fn one_event_per_call_when_it_ends() {
        use http_body::Body as _;
        use tracing_subscriber::layer::SubscriberExt;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let _guard =
            tracing::subscriber::set_default(tracing_subscriber::registry().with(Outcomes(seen.clone())));

        // The status in the trailers, once, when they pass.
        let mut body = record()
            .finish_with(http::Response::new(Body::new(Trailers(false))))
            .into_body();
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            frame.unwrap();
        }
        drop(body);
        assert_eq!(*seen.lock().unwrap(), ["NOT_FOUND"]);

        // A stream dropped before its end: CANCELLED.
        drop(record().finish_with(http::Response::new(Body::new(Endless))));
        // A status in the headers: at once.
        drop(record().finish_with(Status::permission_denied("no").into_http()));
        assert_eq!(
            *seen.lock().unwrap(),
            ["NOT_FOUND", "CANCELLED", "PERMISSION_DENIED"]
        );
    }
}
