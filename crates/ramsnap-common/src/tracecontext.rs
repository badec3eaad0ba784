//! W3C trace context across gRPC calls: a client puts its current span's
//! context in the request's metadata (`traceparent`, `tracestate`), and a
//! server makes the span of the call it serves that context's child, so that
//! a snapshot's coordinator, host and storage spans are one trace. Any
//! client that sends `traceparent` (an OpenTelemetry-instrumented Python or
//! Go client) has its trace continued the same way.
//!
//! Without OTLP export (no OpenTelemetry layer under `tracing`) spans have
//! no trace context: nothing is sent, and a received one is kept on the
//! span only for export that does not happen.
use opentelemetry::propagation::{Extractor, Injector};
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Installs the W3C propagator (done by [`crate::telemetry::init`]).
pub fn install() {
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
}

struct Metadata<'a>(&'a mut MetadataMap);

impl Injector for Metadata<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Puts the current span's trace context into an outgoing request.
pub fn inject(md: &mut MetadataMap) {
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut Metadata(md)));
}

/// The trace context an incoming request carries (an empty one if none).
pub fn extract(headers: &http::HeaderMap) -> opentelemetry::Context {
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&Headers(headers)))
}

/// The span of a served call: a child of the caller's trace context.
pub fn server_span(req: &http::Request<()>) -> tracing::Span {
    let span = tracing::info_span!("grpc", path = %req.uri().path());
    let _ = span.set_parent(extract(req.headers()));
    span
}

/// The current span's `traceparent`, if it is in a trace.
pub fn current_traceparent() -> Option<String> {
    let mut md = MetadataMap::new();
    inject(&mut md);
    md.get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Makes `span` a child of the trace a stored `traceparent` names.
pub fn continue_trace(span: &tracing::Span, traceparent: &str) {
    let mut headers = http::HeaderMap::new();
    if let Ok(v) = traceparent.parse() {
        headers.insert("traceparent", v);
        let _ = span.set_parent(extract(&headers));
    }
}

/// A client interceptor that only propagates the trace context.
#[derive(Clone, Copy, Debug, Default)]
pub struct Propagate;

impl tonic::service::Interceptor for Propagate {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        inject(req.metadata_mut());
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
    use tracing_subscriber::layer::SubscriberExt;

    /// A span's context goes out in `traceparent`, and the served call's
    /// span continues that trace.
    #[test]
    fn the_trace_crosses_a_call() {
        install();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let caller = tracing::info_span!("caller");
            let _in = caller.enter();
            let trace_id = caller.context().span().span_context().trace_id();
            let mut md = MetadataMap::new();
            inject(&mut md);
            let sent = md
                .get("traceparent")
                .expect("traceparent sent")
                .to_str()
                .unwrap()
                .to_string();
            assert!(sent.contains(&trace_id.to_string()), "{sent}");

            let mut req = http::Request::new(());
            *req.uri_mut() = "/ramsnap.host.v1.HostService/SnapshotVm".parse().unwrap();
            req.headers_mut().insert("traceparent", sent.parse().unwrap());
            let served = server_span(&req);
            let got = served.context().span().span_context().trace_id();
            assert_eq!(got, trace_id, "the served span is in the caller's trace");
            // A saga started under this span keeps its traceparent and
            // continues the trace when it runs (or resumes) later.
            let stored = current_traceparent().expect("in a trace");
            drop(_in);
            let saga = tracing::info_span!("saga");
            continue_trace(&saga, &stored);
            assert_eq!(saga.context().span().span_context().trace_id(), trace_id);

            // No header (and, as in a server's task, no current span): a
            // trace of its own.
            let mut alone = http::Request::new(());
            *alone.uri_mut() = "/x".parse().unwrap();
            let own = server_span(&alone).context().span().span_context().trace_id();
            assert_ne!(own, trace_id);
        });
    }
}
