//! Logs go through `tracing` (RUST_LOG filters, `RAMSNAP_LOG_FORMAT=json`
//! for JSON lines). When OTEL_EXPORTER_OTLP_ENDPOINT is set, spans are also
//! exported over OTLP/gRPC to that collector. Metrics: see [`crate::metrics`].
use opentelemetry::trace::TracerProvider as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Keeps the OTLP pipeline alive; dropping it flushes pending spans.
pub struct Telemetry {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
    meters: Option<opentelemetry_sdk::metrics::SdkMeterProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
        if let Some(meters) = self.meters.take() {
            let _ = meters.shutdown();
        }
    }
}

/// Installs the global subscriber. Logs go to stderr; stdout is kept for the
/// machine-readable "listening" line.
pub fn init(service: &'static str) -> Telemetry {
    // OpenTelemetry's own notices ("global meter provider is set") only
    // when asked for.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,opentelemetry=warn,opentelemetry_sdk=warn"));
    let fmt = if std::env::var("RAMSNAP_LOG_FORMAT").as_deref() == Ok("json") {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed()
    };
    crate::tracecontext::install();
    let mut provider = None;
    let otel = if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some() {
        match otlp_provider(service) {
            Ok(p) => {
                let tracer = p.tracer(service);
                provider = Some(p);
                Some(tracing_opentelemetry::layer().with_tracer(tracer))
            }
            Err(e) => {
                eprintln!("ramsnap: OTLP export disabled: {e}");
                None
            }
        }
    } else {
        None
    };
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init();
    Telemetry {
        provider,
        meters: crate::metrics::init(service),
    }
}

fn otlp_provider(service: &'static str) -> anyhow::Result<opentelemetry_sdk::trace::SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().build()?;
    Ok(opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(format!("ramsnap-{service}"))
                .build(),
        )
        .build())
}
